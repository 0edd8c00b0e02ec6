"""Packaging for tornado_chat: a secure-by-default HTTPS/WSS chat server."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="tornado-chat",
    version="0.1.0",
    description="Real-time chat over HTTPS/WSS with JWT auth and its own local CA",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["tornado_chat", "tornado_chat.*"]),
    include_package_data=True,
    package_data={
        "tornado_chat": ["static/*", "migrations/*.py", "migrations/versions/*.py", "py.typed"],
    },
    # Lower bounds are the oldest versions the py310 tox env is tested on
    # (constraints/oldest.txt); each is at or above its last security advisory.
    install_requires=[
        "tornado>=6.5.10",
        "pyjwt[crypto]>=2.14.0",
        "bcrypt>=4.2.0",
        "cryptography>=46.0.5",
        "sqlalchemy[asyncio]>=2.0.36",
        "alembic>=1.14.0",
        "aiosqlite>=0.20.0",
        "asyncpg>=0.30.0",
        "trustme>=1.2.0",
        "redis>=5.2.0",
    ],
    extras_require={
        "test": [
            "pytest>=8.3",
            "pytest-asyncio>=0.24",
            "hypothesis>=6.100",
            "playwright>=1.48",
            "websockets>=13.0",
            "check-jsonschema>=0.29",
        ],
    },
    entry_points={
        "console_scripts": [
            "tornado-chat=tornado_chat.__main__:main",
            "mkcerts=tornado_chat.pki.cli:main",
            "tornado-chat-keys=tornado_chat.keys:main",
        ],
    },
    classifiers=[
        "Framework :: Tornado",
        "Programming Language :: Python :: 3",
        "Topic :: Communications :: Chat",
    ],
)
