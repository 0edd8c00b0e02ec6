// Validates an AsyncAPI document with the AsyncAPI initiative's own parser.
// Usage: node tools/asyncapi/validate.mjs docs/asyncapi.yaml
// Prints the parser's diagnostics as one JSON array; exits 1 when any is an
// error or a warning (severity 0 or 1), or when no document came out.
import { readFile } from 'node:fs/promises';
import { Parser } from '@asyncapi/parser';

const path = process.argv[2];
const source = await readFile(path, 'utf8');
const { document, diagnostics } = await new Parser().parse(source, { source: path });
const found = diagnostics.map((d) => ({
  severity: d.severity,
  code: d.code,
  message: d.message,
  path: d.path,
}));
console.log(JSON.stringify({ parsed: document !== undefined, diagnostics: found }));
process.exit(document !== undefined && found.every((d) => d.severity > 1) ? 0 : 1);
