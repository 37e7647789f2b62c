"""The one source of configuration: env, `.env`, flags and overrides -> a validated `Settings`."""

from settings.config import Settings
from settings.core import core_config
from settings.fields import env_name, flag_name, setting_name
from settings.identity import result_changes, result_settings, run_name, run_path
from settings.loading import SettingsError, flatten, load_settings, nest, parse_flags

__all__ = [
    "Settings",
    "SettingsError",
    "core_config",
    "env_name",
    "flag_name",
    "flatten",
    "load_settings",
    "nest",
    "parse_flags",
    "result_changes",
    "result_settings",
    "run_name",
    "run_path",
    "setting_name",
]
