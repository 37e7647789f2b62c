"""`Settings`: every setting of a training run, in its groups (settings.groups: what a run
trains; settings.run_groups: how it samples, is evaluated, lives and is watched), and the rules
between groups (a folder for a folder dataset, a sampler that fits the formulation, ...).

Loading them from env, `.env`, flags and overrides is settings.loading; which of them name the
run is settings.identity.
"""

from __future__ import annotations

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ddpm.config import CHURN_SAMPLERS, TIMESTEP_SAMPLERS
from settings.fields import ENV_DELIMITER, ENV_PREFIX, FieldError
from settings.groups import (
    DataSettings,
    DiffusionSettings,
    ModelSettings,
    OptimSettings,
    TrainSettings,
)
from settings.run_groups import (
    EvalSettings,
    RunSettings,
    SampleSettings,
    SweepSettings,
    WandbSettings,
)


class Settings(BaseSettings):
    """Every setting of a training run, grouped."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        env_file=".env",
        env_file_encoding="utf-8",
        # A .env may hold other tools' variables (WANDB_API_KEY); our own DDPM_* names are
        # checked by _unknown_env_names, and unknown override keys by nest.
        extra="ignore",
        validate_default=True,
    )

    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    diffusion: DiffusionSettings = DiffusionSettings()
    optim: OptimSettings = OptimSettings()
    train: TrainSettings = TrainSettings()
    sample: SampleSettings = SampleSettings()
    eval: EvalSettings = EvalSettings()
    run: RunSettings = RunSettings()
    wandb: WandbSettings = WandbSettings()
    sweep: SweepSettings = SweepSettings()

    def _a_prepared_dataset(self) -> None:
        """data.folder holds a prepared dataset of data.image_size and model.channels."""
        from ddpm.prepared import PreparedError, read_manifest

        try:
            shape = tuple(read_manifest(self.data.folder)["shape"])
        except PreparedError as err:
            raise FieldError("data.folder", str(err)) from None
        size, channels = self.data.image_size, self.model.channels
        if shape != (channels, size, size):
            raise FieldError(
                "data.image_size",
                f"{self.data.folder} holds {shape[0]}-channel images of {shape[1]} px; set "
                f"data.image_size {shape[1]} and model.channels {shape[0]}, or prepare it "
                f"again at {size} px and {channels} channels",
            )

    def _a_prepared_dataset_url(self) -> None:
        """A URL in data.folder names a prepared dataset in a store pyarrow.fs reads (what it
        holds is checked when the run fetches it, where the credentials are)."""
        from ddpm.prepared import URL_SCHEMES

        folder = str(self.data.folder)
        scheme = folder.split("://", 1)[0].lower()
        if scheme not in URL_SCHEMES:
            schemes = ", ".join(URL_SCHEMES)
            raise FieldError("data.folder", f"{folder}: a URL of {scheme}://, which is not read; "
                              f"give a URL of {schemes}, or a local folder")  # fmt: skip
        if self.data.dataset != "prepared":
            raise FieldError(
                "data.folder",
                f"{folder}: a URL is read as a prepared dataset only; set data.dataset=prepared "
                "(prepare the images with ddpm-prepare and upload that folder)",
            )

    def _data_folder(self) -> None:
        """data.folder is given exactly when data.dataset reads it, and is what it reads."""
        data = self.data
        if data.dataset != "cifar10" and data.folder is None:
            raise FieldError("data.folder", f"is required when data.dataset is {data.dataset!r}")
        if data.folder is not None and data.dataset == "cifar10":
            raise FieldError(
                "data.folder",
                f"is set ({data.folder}) but data.dataset is {data.dataset!r}, which does not "
                "read it: set data.dataset=folder to train on the folder (or prepared, for a "
                "folder ddpm-prepare made), or leave data.folder out",
            )
        if isinstance(data.folder, str):  # a URL (FolderOrURL)
            self._a_prepared_dataset_url()
        elif data.dataset != "cifar10" and not data.folder.is_dir():
            what = "not a folder" if data.folder.exists() else "no such folder"
            raise FieldError("data.folder", f"{what}: {data.folder}")
        if data.dataset == "prepared" and not isinstance(data.folder, str):
            self._a_prepared_dataset()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        self._data_folder()
        if self.data.dataset == "cifar10" and self.data.image_size != 32:
            raise FieldError("data.image_size", "must be 32 for cifar10 (its native size)")
        if self.data.dataset == "cifar10" and self.model.channels != 3:
            raise FieldError("model.channels", "must be 3 for cifar10 (RGB)")
        if (
            self.data.loader == "device"
            and self.data.dataset == "folder"
            and self.data.prepare == "off"
        ):
            raise FieldError("data.loader", "device needs images in memory: data.dataset "
                              "cifar10 or prepared, or folder with data.prepare=auto")  # fmt: skip
        model, size = self.model, self.data.image_size
        if model.arch == "ddpm":
            if model.hidden_size % 32:
                raise FieldError(
                    "model.hidden_size",
                    f"must be a multiple of 32 for model.arch=ddpm (GroupNorm(32)), got "
                    f"{model.hidden_size}",
                )
            reached = [size >> i for i in range(len(model.channel_mult))]
            missing = sorted(set(model.attention_resolutions) - set(reached))
            if missing:
                raise FieldError(
                    "model.attention_resolutions",
                    f"{missing} never reached: with data.image_size {size} and "
                    f"{len(model.channel_mult)} levels (model.channel_mult) the network sees "
                    f"{reached}",
                )
        if model.checkpointing and model.arch != "ddpm":
            raise FieldError("model.checkpointing", "applies to model.arch=ddpm only")
        if model.augment_labels and not self.data.random_flip:
            raise FieldError("model.augment_labels", "labels the flips of data.random_flip, "
                              "which is off")  # fmt: skip
        if self.train.accumulate > self.train.batch_size:
            raise FieldError(
                "train.accumulate",
                f"must be at most train.batch_size ({self.train.batch_size}): each micro-batch "
                "takes a share of a batch",
            )
        if self.train.batch_size < self.train.devices:
            raise FieldError(
                "train.devices",
                f"must be at most train.batch_size ({self.train.batch_size}): each process "
                "takes a share of every batch",
            )
        self._sample_rules()
        return self

    def _sample_rules(self) -> None:
        """The sample.* settings against each other and the diffusion's (_consistent's)."""
        self._sampler_fits_the_formulation()
        sample = self.sample
        if sample.s_churn > 0 and sample.sampler not in CHURN_SAMPLERS:
            raise FieldError("sample.s_churn", "applies to sample.sampler euler or heun only")
        if sample.sigma_min and sample.sigma_max and sample.sigma_min > sample.sigma_max:
            raise FieldError("sample.sigma_min", f"must be at most sample.sigma_max "
                              f"({sample.sigma_max}), got {sample.sigma_min}")  # fmt: skip
        if sample.sampler in ("ddim", "dpmpp_2m") and sample.steps > self.diffusion.num_timesteps:
            raise FieldError(
                "sample.steps",
                f"must be at most diffusion.num_timesteps ({self.diffusion.num_timesteps})",
            )

    def _sampler_fits_the_formulation(self) -> None:
        """An edm run has no timesteps: with no sampler named it samples with heun on 18
        steps (EDM's CIFAR-10 choice, 35 network calls); a timestep sampler named is refused."""
        if self.diffusion.formulation != "edm":
            return
        sample = self.sample
        if sample.sampler not in TIMESTEP_SAMPLERS:
            return
        if "sampler" in sample.model_fields_set:
            raise FieldError(
                "sample.sampler",
                f"{sample.sampler} steps through the discrete formulation's timesteps; with "
                "diffusion.formulation edm use euler, heun, dpmpp_2m_karras or dpmpp_3m_karras",
            )
        update = {"sampler": "heun"}
        if "steps" not in sample.model_fields_set:
            update["steps"] = 18
        self.sample = sample.model_copy(update=update)
