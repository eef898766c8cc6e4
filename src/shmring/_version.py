"""The package version, in one place (shmring.__version__, shmring --version); pyproject.toml says the same."""
__version__ = "0.1.0"
