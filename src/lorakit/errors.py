"""Exceptions raised by lorakit. Each one carries a message that says what to do."""


class LoraKitError(Exception):
    """Base class for lorakit errors."""


class ConfigError(LoraKitError, ValueError):
    """A LoraConfig (or adapter_config.json) value is invalid."""


class TargetModulesError(LoraKitError, ValueError):
    """target_modules matched nothing, or matched a module type LoRA cannot wrap."""


class AdapterLoadError(LoraKitError, ValueError):
    """An adapter file is missing, corrupt, or does not fit the base model."""


class AdapterFileNotFoundError(AdapterLoadError, FileNotFoundError):
    """An adapter directory or one of its files does not exist."""


class AdapterNotFoundError(LoraKitError, KeyError, ValueError):
    """An adapter name that is not loaded was asked for (a ValueError, as PEFT raises, and a KeyError)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class TrainError(LoraKitError, ValueError):
    """A training run cannot start or continue as asked."""


class ExportError(LoraKitError, ValueError):
    """An adapter cannot be exported as asked (the output path, or a format that cannot hold it)."""
