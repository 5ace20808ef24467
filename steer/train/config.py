"""Typed configuration of a fine-tuning run: one dataclass per component, loaded from YAML.

``load_config("configs/digits_rtb.yaml", ["objective.beta=0.5", "train.steps=10"])`` merges the
file and ``a.b=value`` overrides onto the defaults with OmegaConf (types are checked), then
builds the dataclasses, whose ``__post_init__`` validates every value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from steer.config import check_choice, check_number, load_structured
from steer.train.objectives import Needs, objective_class

PENALTIES = ("squared", "huber", "log_cosh")
MIXED_PRECISION = ("no", "fp16", "bf16")
TRACKERS = ("tensorboard", "wandb", "none")
PROMPT_LISTS = ("simple-animals", "digits")


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    check_choice(name, value, valid)


def _positive(name: str, value: float, strict: bool = True) -> None:
    """``> 0`` (``>= 0`` unless ``strict``) and finite; NaN never passes."""
    check_number(name, value, **({"gt": 0} if strict else {"ge": 0}))


def _at_least(name: str, value: int, low: int) -> None:
    check_number(name, value, ge=low)


def _text(name: str, value: str | None, optional: bool = True) -> None:
    """A non-empty string (or None when ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


@dataclass
class ModelConfig:
    """The pretrained diffusion model: ``digits`` (embedded default, trained on first use),
    ``tiny`` / ``tiny-unconditional`` (random tiny pipelines for tests), a hub id or a folder."""

    pretrained: str = "digits"
    revision: str | None = None
    num_inference_steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 1.0
    timestep_spacing: str | None = None  # leading | trailing | linspace; None keeps the model's
    # the sampler fine-tuned, over the model's own noise schedule (DDIM's η family; a
    # DDPM-scheduled model is sampled by DDIM too unless this says DDPMScheduler)
    scheduler: str | None = None  # None: the model family's first (UNets: DDIMScheduler)
    # keyword arguments of the pipeline's from_pretrained, e.g. {text_encoder_3: null,
    # tokenizer_3: null} loads SD3 without its T5 encoder (less memory, other embeddings)
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False
    cache_dir: str | None = None
    # the last N steps sample from the frozen prior: fine-tuning acts on the first K - N steps
    # (at low noise the posterior's kernel is the prior's; their RTB terms cancel exactly)
    prior_tail_steps: int = 0
    # build model.pretrained's published architecture with random weights, offline
    # (steer.pipelines.architectures): a preset's first step at real size before any download
    random_weights: bool = False
    sample_size: int | None = None  # latent side to sample; None: the model's (SD 1.5: 64)
    # images the VAE decodes at once for the rewards (its activations at 1024² are ~2 GB an
    # image); None: train.batch_size
    decode_batch_size: int | None = None
    # refuse, before loading, a run whose estimated memory exceeds the device's free memory
    # (or memory_limit_gb): the estimate and the options that reduce it (steer.train.memory)
    check_memory: bool = True
    memory_limit_gb: float | None = None

    def __post_init__(self) -> None:
        _text("model.pretrained", self.pretrained, optional=False)
        _text("model.revision", self.revision)
        _at_least("model.num_inference_steps", self.num_inference_steps, 1)
        _positive("model.eta", self.eta, strict=False)
        if not 0 <= self.prior_tail_steps < self.num_inference_steps:
            raise ValueError(
                f"model.prior_tail_steps must be in [0, {self.num_inference_steps - 1}] "
                f"(model.num_inference_steps={self.num_inference_steps}), "
                f"got {self.prior_tail_steps}"
            )
        _positive("model.guidance_scale", self.guidance_scale, strict=False)
        if self.sample_size is not None:
            _at_least("model.sample_size", self.sample_size, 1)
        if self.decode_batch_size is not None:
            _at_least("model.decode_batch_size", self.decode_batch_size, 1)
        if self.memory_limit_gb is not None:
            _positive("model.memory_limit_gb", self.memory_limit_gb)
        if self.random_weights:
            from steer.pipelines.architectures import architecture

            architecture(self.pretrained)  # a published architecture, else the known ones

        if self.scheduler is not None:
            from steer.diffusion import FAMILIES

            known = tuple(dict.fromkeys(n for f in FAMILIES.values() for n in f.schedulers))
            _choice("model.scheduler", self.scheduler, known)
        if self.timestep_spacing is not None:
            _choice("model.timestep_spacing", self.timestep_spacing,
                    ("leading", "trailing", "linspace"))  # fmt: skip
        _text("model.cache_dir", self.cache_dir)
        if self.cache_dir is not None and Path(self.cache_dir).expanduser().is_file():
            raise ValueError(
                f"model.cache_dir={self.cache_dir!r} is a file; give a folder (or null for "
                "$STEER_CACHE / ~/.cache/steer)"
            )


@dataclass
class LoraConfig:
    """LoRA adapters through peft (``enabled``), or full fine-tuning of the UNet otherwise (small
    models only; the frozen prior is then a copy)."""

    enabled: bool = True
    rank: int = 8
    alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def __post_init__(self) -> None:
        _at_least("lora.rank", self.rank, 1)
        _positive("lora.alpha", self.alpha)
        if self.enabled and not self.target_modules:
            raise ValueError("lora.target_modules is empty; name the UNet modules to adapt")
        bad = [m for m in self.target_modules if not str(m).strip()]
        if bad:
            raise ValueError(f"lora.target_modules holds an empty name: {self.target_modules}")


@dataclass
class ObjectiveConfig:
    """The training objective and its own parameters (defaults from the papers).

    ddpo / dpok reuse each rollout batch PPO-style: ``ppo_epochs`` passes over it, each split
    into ``ppo_minibatches`` minibatches of ``train.batch_size / ppo_minibatches`` rows (times
    ``train.grad_accum`` rollouts), one optimiser step per minibatch, the ratio taken against the
    log-probs stored at rollout time. One ``train.steps`` step is one round of rollouts, so a run
    makes ``train.steps × ppo_epochs × ppo_minibatches`` optimiser updates. Defaults (with
    ``ppo_minibatches`` unset): ddpo 1 epoch × 2 minibatches (ddpo-pytorch's default config: two
    updates per sampling round, so the clip binds on the second); dpok 1 × 1 (its paper: one
    on-policy update per rollout; reused, its policy-gradient term is importance-weighted).
    """

    name: str = "rtb"
    beta: float = 1.0  # reward temperature: log R(x) = r(x) / beta
    penalty: str = "squared"
    log_z_lr: float = 1e-1
    log_z_init: float = 0.0
    log_z_mode: str = "auto"  # table (fixed prompt set) | network (open set) | batch | auto
    flow_lr: float = 1e-3
    subtb_lambda: float = 0.9
    train_fraction: float = 1.0  # fraction of the K steps re-scored with grad per trajectory
    clip_range: float = 1e-4  # ddpo / grpo PPO-clip range on the per-step ratio
    ratio_per_dim: bool = True  # ddpo: ratio of per-dimension geometric-mean densities, as DDPO
    kl_weight: float = 0.01  # dpok / grpo (0 turns it off): weight of the per-step KL to the prior
    advantage_clip: float = 5.0
    ppo_epochs: int = 1  # ddpo / dpok / grpo: passes over each rollout batch
    ppo_minibatches: int | None = None  # per pass, one update each; None: 2 (ddpo, grpo), 1 (dpok)
    group_size: int = 4  # grpo: samples per prompt group (the batch holds batch_size / group_size)

    def __post_init__(self) -> None:
        objective_class(self.name)  # a registered objective, else the valid names
        for name in ("ppo_epochs", "ppo_minibatches"):
            value = getattr(self, name)
            if value is not None:
                _at_least(f"objective.{name}", value, 1)
        _choice("objective.penalty", self.penalty, PENALTIES)
        _choice("objective.log_z_mode", self.log_z_mode, ("auto", "table", "network", "batch"))
        _positive("objective.beta", self.beta)
        check_number("objective.train_fraction", self.train_fraction, gt=0, le=1)
        _positive("objective.log_z_lr", self.log_z_lr)
        check_number("objective.log_z_init", self.log_z_init)  # finite
        _positive("objective.flow_lr", self.flow_lr)
        _positive("objective.subtb_lambda", self.subtb_lambda, strict=False)
        _positive("objective.clip_range", self.clip_range)
        _positive("objective.kl_weight", self.kl_weight, strict=False)
        _positive("objective.advantage_clip", self.advantage_clip)
        _at_least("objective.group_size", self.group_size, 1)

    @property
    def needs(self) -> Needs:
        """What the named objective asks of the run (``steer.train.objectives.Needs``)."""
        return objective_class(self.name).needs

    @property
    def minibatches(self) -> int:
        """``ppo_minibatches``, or the objective's default when unset (ddpo 2, others 1)."""
        if self.ppo_minibatches is not None:
            return self.ppo_minibatches
        return objective_class(self.name).default_minibatches


@dataclass
class RewardConfig:
    """A reward of ``steer.rewards`` by name, with its keyword arguments."""

    name: str = "digits-classifier"
    kwargs: dict[str, Any] = field(default_factory=dict)
    # the reward's published architecture with random weights, offline (its registry entry's
    # random_kwargs under kwargs); None follows model.random_weights
    random_weights: bool | None = None

    def __post_init__(self) -> None:
        # the name is looked up (and the keywords checked) when the run builds the reward:
        # a reward a user registers after loading the config is still found
        _text("reward.name", self.name, optional=False)


@dataclass
class PromptConfig:
    """Training prompts: a single ``prompt``, a ``file`` (one per line) or a ``builtin`` list;
    none of them for unconditional models."""

    prompt: str | None = None
    file: str | None = None
    builtin: str | None = None
    eval_prompts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        given = [k for k in ("prompt", "file", "builtin") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(
                f"give one prompt source, got {['prompts.' + k for k in given]}; set the others "
                "to null"
            )
        _text("prompts.prompt", self.prompt)
        _text("prompts.file", self.file)
        if self.builtin is not None:
            _choice("prompts.builtin", self.builtin, PROMPT_LISTS)
        bad = [p for p in self.eval_prompts if not str(p).strip()]
        if bad:
            raise ValueError(f"prompts.eval_prompts holds an empty prompt: {self.eval_prompts}")


@dataclass
class OptimConfig:
    """The optimisation: sizes, steps, precision, seeds."""

    steps: int = 100  # rounds of grad_accum rollouts, one optimiser step each (ddpo/dpok: more)
    batch_size: int = 8  # trajectories per process per rollout
    grad_accum: int = 1  # rollouts per optimiser step
    lr: float = 3e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    replay_buffer: int = 0  # trajectories kept for off-policy re-use; 0 = on-policy only
    replay_per_batch: int = 0  # buffer trajectories added to each fresh batch (re-scored)
    exploration_scale: float = 0.0  # σ × (1 + scale) at rollout; log P_F stays the policy's
    on_nonfinite: str = "raise"  # raise (after saving a checkpoint) | skip (and count)
    lr_schedule: str = "constant"  # constant | cosine (to lr_min_ratio × lr at the last update)
    lr_warmup_steps: int = 0  # linear warm-up over the first updates
    lr_min_ratio: float = 0.1

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            _at_least(f"train.{name}", getattr(self, name), 1)
        _positive("train.lr", self.lr)
        _positive("train.weight_decay", self.weight_decay, strict=False)
        _positive("train.max_grad_norm", self.max_grad_norm)
        check_number("train.seed", self.seed, ge=0, lt=2**32)  # numpy's seed range
        if str(self.mixed_precision).lower() == "false":  # YAML 1.1 reads `no` as False
            self.mixed_precision = "no"
        _choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _choice("train.on_nonfinite", self.on_nonfinite, ("raise", "skip"))
        _choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _at_least("train.lr_warmup_steps", self.lr_warmup_steps, 0)
        check_number("train.lr_min_ratio", self.lr_min_ratio, ge=0, le=1)
        _at_least("train.replay_buffer", self.replay_buffer, 0)
        _at_least("train.replay_per_batch", self.replay_per_batch, 0)
        if self.replay_per_batch > 0 and self.replay_buffer < self.replay_per_batch:
            raise ValueError(
                f"train.replay_buffer={self.replay_buffer} must hold at least "
                f"train.replay_per_batch={self.replay_per_batch} trajectories"
            )
        _positive("train.exploration_scale", self.exploration_scale, strict=False)


@dataclass
class LogConfig:
    """Outputs, trackers, evaluation and checkpoints."""

    output_dir: str = "outputs"
    run_name: str | None = None  # default: <objective>-<timestamp>
    tracker: str = "tensorboard"
    eval_every: int = 0  # 0 = only at the end
    num_eval_samples: int = 16
    checkpoint_every: int = 0  # 0 = only at the end
    checkpoints_total_limit: int = 2
    resume_from_checkpoint: str | None = None  # "latest" or a path
    # "module:function" called as function(run, wall_time) on the main process after the run,
    # returning a summary to print (the digits job: steer.digits.report:report_run)
    report: str | None = None

    def __post_init__(self) -> None:
        _text("log.output_dir", self.output_dir, optional=False)
        _text("log.run_name", self.run_name)
        if self.run_name is not None and ("/" in self.run_name or "\\" in self.run_name
                                          or self.run_name in (".", "..")):  # fmt: skip
            raise ValueError(
                f"log.run_name={self.run_name!r} must be a folder name, not a path; put the "
                "parent folder in log.output_dir"
            )
        _choice("log.tracker", self.tracker, TRACKERS)
        _at_least("log.eval_every", self.eval_every, 0)
        _at_least("log.num_eval_samples", self.num_eval_samples, 1)
        _at_least("log.checkpoint_every", self.checkpoint_every, 0)
        _at_least("log.checkpoints_total_limit", self.checkpoints_total_limit, 1)
        _text("log.resume_from_checkpoint", self.resume_from_checkpoint)
        report = self.report
        if report is not None and (report.count(":") != 1 or not all(report.split(":"))):
            raise ValueError(f"log.report must look like module:function, got {report!r}")


@dataclass
class FinetuneConfig:
    """A fine-tuning run: one section per component (``model.*``, ``lora.*``, ...)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        mb, on_policy = self.objective.minibatches, self.objective.needs.on_policy
        if on_policy and self.train.batch_size % mb:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} must be divisible by "
                f"objective.ppo_minibatches={mb}"
            )
        objective_class(self.objective.name).check_config(self)  # the objective's own rules
        off_policy = self.train.replay_per_batch > 0 or self.train.exploration_scale > 0
        if off_policy and on_policy:
            raise ValueError(
                f"objective.name={self.objective.name!r} is on-policy: set train.replay_per_batch=0"
                " and train.exploration_scale=0 (off-policy data needs a GFlowNet objective)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> FinetuneConfig:
    """Defaults ← YAML file ← ``a.b=value`` overrides, type-checked, then validated
    (:func:`steer.config.load_structured`; its :class:`~steer.config.ConfigError` is a
    ``ValueError``)."""
    return load_structured(FinetuneConfig, path, overrides)
