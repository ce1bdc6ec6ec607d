"""Pretraining (tokenizer stage, then DAT stage) and the adaptation of a pretrained DAT.

Deterministic for a seed and resumable: the batch and the random noise of
step s are drawn from generators seeded by ``(seed, stage, s, rank)``, so a
run resumed from a checkpoint continues exactly as if it had not stopped.
Under ``torchrun`` the same code runs data-parallel (DistributedDataParallel,
gloo on CPU, nccl on GPU); rank 0 writes checkpoints and progress.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from calm_rt.data.splits import TRAIN, PreparedSession
from calm_rt.errors import ConfigError, DataError
from calm_rt.model import PRESETS, CalM, CalMConfig, frame_windows, load_checkpoint, save_checkpoint

__all__ = [
    "TrainConfig",
    "adapt",
    "pretrain",
    "pretrain_dat",
    "tokenize_sessions",
]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation knobs of ``calm-rt pretrain`` (model shape is in CalMConfig)."""

    tokenizer_steps: int = 2000
    dat_steps: int = 3000
    tokenizer_batch: int = 4096
    tokenizer_lr: float = 3e-3
    commit_weight: float = 0.25
    orthogonality_weight: float = 0.1
    temperature_start: float = 1.0
    temperature_end: float = 0.1
    restart_every: int = 100
    dat_batch: int = 8
    # Each batch attends over a random neuron subset, its size log-uniform in
    # [min_neurons, max_neurons] (capped by the session), so neural attention can
    # meet the small and large populations it runs on live. None: one size,
    # max_neurons, the shipped recipe (a 16-128 mix was tried and not kept: docs/model.md).
    min_neurons: int | None = None
    max_neurons: int = 64
    # With subsets of varying size: neurons x batch per step stay near this many
    # sequences (a batch of 512 neurons is one window), so a step costs about the same
    # at any size. 0: dat_batch windows whatever the size.
    sequence_budget: int = 0
    seq_tokens: int = 24
    dat_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    save_every: int = 500
    seed: int = 0
    # Models with a continuous head: its MSE on the change over the horizon (what a rig
    # is scored on) beside the token cross-entropy, and its s.d.'s Gaussian likelihood.
    forecast_weight: float = 1.0
    nll_weight: float = 0.1

    def __post_init__(self) -> None:
        smallest = self.max_neurons if self.min_neurons is None else self.min_neurons
        if min(self.tokenizer_batch, self.dat_batch, smallest, self.seq_tokens) < 1:
            raise ConfigError("batch sizes, min_neurons, max_neurons and seq_tokens must be >= 1")
        if self.max_neurons < smallest:
            raise ConfigError(
                f"max_neurons ({self.max_neurons}) must be >= min_neurons ({self.min_neurons})"
            )
        if self.tokenizer_steps < 0 or self.dat_steps < 0:
            raise ConfigError("step counts must be >= 0")
        if self.sequence_budget < 0 or self.forecast_weight < 0 or self.nll_weight < 0:
            raise ConfigError("sequence_budget, forecast_weight and nll_weight must be >= 0")


# ---------------------------------------------------------------------------
# Distributed helpers (no-ops in a single process)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group when launched by torchrun; returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return _world()


def _rng(
    seed: int, stage: int, step: int, rank: int
) -> tuple[np.random.Generator, torch.Generator]:
    ss = np.random.SeedSequence([seed, stage, step, rank])
    g = torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0] % (2**63)))
    return np.random.default_rng(ss), g


# ---------------------------------------------------------------------------
# Optimiser state as safetensors (resumable without pickle)


def _save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    save_file(tensors, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(
        json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})
    )


def _load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path.with_suffix(".safetensors")))
    meta = json.loads(path.with_suffix(".json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ---------------------------------------------------------------------------
# Data sampling


def _train_window_ends(prepared: PreparedSession, span: int) -> np.ndarray:
    """Frames t such that frames ``[t - span + 1, t]`` are all training frames."""
    is_train = (prepared.labels == TRAIN).astype(np.int64)
    run = np.zeros_like(is_train)
    acc = 0
    for i, v in enumerate(is_train):  # length of the train run ending at i
        acc = acc + 1 if v else 0
        run[i] = acc
    return np.flatnonzero(run >= span)


def _sample_tokenizer_batch(
    sessions: Sequence[PreparedSession],
    ends: Sequence[np.ndarray],
    rng: np.random.Generator,
    batch: int,
    patch: int,
) -> Tensor:
    weights = np.array([s.n_neurons * len(e) for s, e in zip(sessions, ends)], dtype=float)
    which = rng.choice(len(sessions), size=batch, p=weights / weights.sum())
    out = np.empty((batch, patch), np.float32)
    for k in np.unique(which):
        rows = np.flatnonzero(which == k)
        s, e = sessions[k], ends[k]
        neuron = rng.integers(0, s.n_neurons, size=rows.size)
        t = e[rng.integers(0, e.size, size=rows.size)]
        idx = t[:, None] - np.arange(patch - 1, -1, -1)[None, :]
        out[rows] = s.z[neuron[:, None], idx]
    return torch.from_numpy(np.nan_to_num(out, nan=0.0))


def tokenize_sessions(
    model: CalM, sessions: Sequence[PreparedSession], chunk: int = 4096
) -> list[np.ndarray]:
    """Token ids ``[N, T]`` (int16) of every frame of every session."""
    out = []
    p = model.config.patch
    for s in sessions:
        z = torch.from_numpy(np.nan_to_num(s.z, nan=0.0))
        windows = frame_windows(z, p).reshape(-1, p)
        ids = torch.cat(
            [
                model.tokenizer.tokenize_windows(windows[i : i + chunk * 16])
                for i in range(0, len(windows), chunk * 16)
            ]
        )
        out.append(ids.view(s.n_neurons, -1).to(torch.int16).numpy())
    return out


class DATBatch(NamedTuple):
    """One training batch of the transformer: ``B`` windows of one session, ``n`` neurons."""

    inputs: Tensor  # [B, n, L] token ids
    targets: Tensor  # [B, n, L, k] the token m chain steps ahead
    values: Tensor  # [B, n, L, P] the raw window each input token summarises
    context: (
        Tensor  # [B, n, L, forecast_context] the frames up to each input (the continuous head's)
    )
    future: Tensor  # [B, n, L, k*P] the frames after each input


def _dat_span(cfg: TrainConfig, model_cfg: CalMConfig) -> int:
    """Frames one training window covers: the chains, their targets, the first input's context."""
    p, k = model_cfg.patch, model_cfg.dat.horizon_tokens
    return p * (cfg.seq_tokens + k - 1) + max(p, model_cfg.forecast_context)


def _sample_dat_batch(
    sessions: Sequence[PreparedSession],
    tokens: Sequence[np.ndarray],
    ends: Sequence[np.ndarray],
    rng: np.random.Generator,
    cfg: TrainConfig,
    model_cfg: CalMConfig,
) -> DATBatch:
    """One session, windows of ``seq_tokens + k`` chain tokens, a neuron subset."""
    if cfg.sequence_budget:  # sessions by time, large populations a little more often
        weights = np.array([len(e) * np.sqrt(s.n_neurons) for s, e in zip(sessions, ends)])
    else:
        weights = np.array(
            [len(e) * min(s.n_neurons, cfg.max_neurons) for s, e in zip(sessions, ends)], float
        )
    k_sess = rng.choice(len(sessions), p=weights / weights.sum())
    s, tok, e = sessions[k_sess], tokens[k_sess], ends[k_sess]
    p, k, length = model_cfg.patch, model_cfg.dat.horizon_tokens, cfg.seq_tokens
    n_max = min(s.n_neurons, cfg.max_neurons)
    n_min = n_max if cfg.min_neurons is None else min(cfg.min_neurons, n_max)
    n = n_max  # one size draws nothing, so the shipped recipe's random stream is unchanged
    if n_min < n_max:
        n = int(round(np.exp(rng.uniform(np.log(n_min), np.log(n_max)))))
    batch = max(1, cfg.sequence_budget // n) if cfg.sequence_budget else cfg.dat_batch
    neurons = np.sort(rng.choice(s.n_neurons, size=n, replace=False))
    last = e[rng.integers(0, e.size, size=batch)]  # frame of the last target token
    frames = last[:, None] - p * np.arange(length + k - 1, -1, -1)[None, :]  # [B, L + k]
    chain = tok[neurons][:, frames].astype(np.int64).transpose(1, 0, 2)  # [B, n, L + k]
    chain = torch.from_numpy(chain)
    inputs = chain[..., :length]
    targets = torch.stack([chain[..., m : m + length] for m in range(1, k + 1)], dim=-1)
    # Raw frames around each input: its context (and window) before, the horizon after.
    c = max(p, model_cfg.forecast_context)
    offsets = np.arange(-c + 1, k * p + 1)
    idx = frames[:, :length, None] + offsets[None, None, :]  # [B, L, C + H]
    raw = np.nan_to_num(s.z[neurons][:, idx]).transpose(1, 0, 2, 3)  # [B, n, L, C + H]
    raw = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
    context = raw[..., c - model_cfg.forecast_context : c]
    return DATBatch(inputs, targets, raw[..., c - p : c], context, raw[..., c:])


class _Trained(nn.Module):
    """What the transformer stage trains: the DAT and the continuous head (one DDP unit)."""

    def __init__(self, model: CalM) -> None:
        super().__init__()
        self.dat = model.dat
        self.forecast_head = model.forecast_head

    def forward(self, batch: DATBatch) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Logits ``[B, n, L, k, K]``, and the head's mean and s.d. ``[B, n, L, H]`` (or None)."""
        hidden, logits = self.dat(batch.inputs, values=batch.values)
        if self.forecast_head is None:
            return logits, None, None
        mean, std = self.forecast_head(batch.context, hidden)
        return logits, mean, std


# ---------------------------------------------------------------------------
# Pretraining


def _progress(total: int, desc: str, initial: int, enabled: bool) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=2.0,
    )


def _codebook_stats(counts: Tensor) -> dict[str, float]:
    p = counts / counts.sum().clamp_min(1)
    nz = p[p > 0]
    return {
        "perplexity": float(torch.exp(-(nz * nz.log()).sum())),
        "codes_used": float((counts > 0).float().mean()),
    }


def _write_state(out: Path, state: dict[str, Any]) -> None:
    tmp = out / "train_state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(out / "train_state.json")


def pretrain(
    sessions: Sequence[PreparedSession],
    out_dir: str | Path,
    model_config: CalMConfig | str = "small",
    train_config: TrainConfig | None = None,
    resume: bool = True,
    progress: bool = True,
    data_summary: dict[str, Any] | None = None,
) -> CalM:
    """Pretrain CalM on the training frames of ``sessions``; checkpoints go to ``out_dir``."""
    cfg = train_config or TrainConfig()
    if isinstance(model_config, str):
        if model_config not in PRESETS:
            raise ConfigError(f"unknown preset {model_config!r}; choose one of {sorted(PRESETS)}")
        model_config = PRESETS[model_config]
    if not sessions:
        raise DataError("no sessions to pretrain on")
    rank, world = _world()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = CalM(model_config)
    state: dict[str, Any] = {"stage": "tokenizer", "step": 0, "history": []}
    if resume and (out / "train_state.json").exists():
        state = json.loads((out / "train_state.json").read_text())
        model, _ = load_checkpoint(out)
        if model.config != model_config:
            raise ConfigError(
                f"{out} holds a run with another model shape; use a new --out or --no-resume"
            )
        if progress and rank == 0:
            print(f"resuming {out} at stage {state['stage']}, step {state['step']}", flush=True)
    state.update(train_config=asdict(cfg), world_size=world, data=data_summary or {})

    p = model_config.patch
    tok_ends = [_train_window_ends(s, p) for s in sessions]
    if sum(len(e) for e in tok_ends) == 0:
        raise DataError("no training frames: sessions are shorter than one training block")

    # -- stage 1: tokenizer -------------------------------------------------
    if state["stage"] == "tokenizer":
        tok = model.tokenizer
        tok.train()
        opt = torch.optim.AdamW(tok.parameters(), lr=cfg.tokenizer_lr, weight_decay=0.0)
        if state["step"] > 0 and (out / "optimizer.safetensors").exists():
            _load_optimizer(opt, out / "optimizer")
        ddp = nn.parallel.DistributedDataParallel(tok) if world > 1 else tok
        # Code usage since the last dead-code restart; saved with the state so that
        # a resumed run restarts the same codes as an uninterrupted one.
        counts = torch.tensor(
            state.get("code_counts") or [0.0] * model_config.tokenizer.codebook_size
        )
        bar = _progress(cfg.tokenizer_steps, "tokenizer", state["step"], progress and rank == 0)
        t0 = time.perf_counter()
        for step in range(state["step"], cfg.tokenizer_steps):
            rng, gen = _rng(cfg.seed, 1, step, rank)
            x = _sample_tokenizer_batch(sessions, tok_ends, rng, cfg.tokenizer_batch, p)
            frac = step / max(1, cfg.tokenizer_steps - 1)
            temp = cfg.temperature_start * (cfg.temperature_end / cfg.temperature_start) ** frac
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg.tokenizer_steps, cfg.tokenizer_lr, cfg.warmup_steps)
            torch.manual_seed(int(gen.initial_seed() % (2**31)))  # Gumbel noise
            recon, ids, commit = tok.quantize_train(ddp(x), temp)  # ddp(x) encodes
            rec = F.mse_loss(recon, x)
            loss = (
                rec
                + cfg.commit_weight * commit
                + cfg.orthogonality_weight * tok.orthogonality_loss()
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(tok.parameters(), cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                counts += torch.bincount(ids, minlength=counts.numel()).float()
                if (step + 1) % cfg.restart_every == 0:
                    _restart_dead_codes(tok, counts, x, rng)
                    stats = _codebook_stats(counts)
                    state["history"].append(
                        {
                            "stage": "tokenizer",
                            "step": step + 1,
                            "loss": float(rec.detach()),
                            **stats,
                        }
                    )
                    counts.zero_()
            bar.set_postfix(recon=f"{float(rec.detach()):.4f}", temp=f"{temp:.2f}", refresh=False)
            bar.update(1)
            state["step"] = step + 1
            if rank == 0 and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.tokenizer_steps):
                state["code_counts"] = counts.tolist()
                save_checkpoint(model, out)
                _save_optimizer(opt, out / "optimizer")
                _write_state(out, state)
        bar.close()
        if cfg.tokenizer_steps and progress and rank == 0:
            rate = (
                cfg.tokenizer_batch
                * (cfg.tokenizer_steps - 0)
                / max(time.perf_counter() - t0, 1e-9)
            )
            print(f"tokenizer done: {rate:,.0f} windows/s", flush=True)
        state.update(stage="dat", step=0)
        state.pop("code_counts", None)
        if rank == 0:
            save_checkpoint(model, out)
            _write_state(out, state)
            (out / "optimizer.safetensors").unlink(missing_ok=True)
            (out / "optimizer.json").unlink(missing_ok=True)

    # -- stage 2: dual-axis transformer -------------------------------------
    if state["stage"] == "dat" and cfg.dat_steps == 0:
        state.update(stage="done")
    if state["stage"] == "dat":

        def checkpoint(opt: torch.optim.Optimizer) -> None:
            save_checkpoint(model, out)
            _save_optimizer(opt, out / "optimizer")
            _write_state(out, state)

        resume_opt = out / "optimizer" if (out / "optimizer.safetensors").exists() else None
        _train_dat(model, sessions, cfg, state, checkpoint, resume_opt, progress and rank == 0)
        state.update(stage="done", step=0)
        if rank == 0:
            save_checkpoint(model, out, extra={"pretraining": _summary(state)})
            _write_state(out, state)
            (out / "optimizer.safetensors").unlink(missing_ok=True)
            (out / "optimizer.json").unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
    model.eval()
    return model


def _train_dat(
    model: CalM,
    sessions: Sequence[PreparedSession],
    cfg: TrainConfig,
    state: dict[str, Any],
    checkpoint: Callable[[torch.optim.Optimizer], None] | None,
    resume_optimizer: Path | None,
    progress: bool,
    desc: str = "DAT",
) -> None:
    """Next-token (multi-token) training of the DAT on training frames; tokenizer frozen.

    Runs steps ``state["step"]`` .. ``cfg.dat_steps``; ``checkpoint(opt)`` is
    called every ``save_every`` steps and at the end (rank 0 only).
    """
    rank, world = _world()
    model_config = model.config
    model.tokenizer.eval()
    for prm in model.tokenizer.parameters():
        prm.requires_grad_(False)
    tokens = tokenize_sessions(model, sessions)
    span = _dat_span(cfg, model_config)
    dat_ends = [_train_window_ends(s, span) for s in sessions]
    keep = [i for i, e in enumerate(dat_ends) if len(e)]
    if not keep:
        raise DataError(
            f"no training run of {span} frames; lower --seq-tokens or use longer sessions"
        )
    sess_k = [sessions[i] for i in keep]
    tok_k = [tokens[i] for i in keep]
    ends_k = [dat_ends[i] for i in keep]
    trained = _Trained(model)
    trained.train()
    named = list(trained.named_parameters())
    decays = [q.dim() >= 2 and "embed" not in n_ for n_, q in named]
    params = [q for _, q in named]
    opt = torch.optim.AdamW(
        [
            {"params": [q for q, d in zip(params, decays) if d], "weight_decay": cfg.weight_decay},
            {"params": [q for q, d in zip(params, decays) if not d], "weight_decay": 0.0},
        ],
        lr=cfg.dat_lr,
        betas=(0.9, 0.95),
    )
    if state["step"] > 0 and resume_optimizer is not None:
        _load_optimizer(opt, resume_optimizer)
    ddp = nn.parallel.DistributedDataParallel(trained) if world > 1 else trained
    bar = _progress(cfg.dat_steps, desc, state["step"], progress)
    log_every = max(1, min(50, cfg.dat_steps // 10))
    t0, seen = time.perf_counter(), 0
    for step in range(state["step"], cfg.dat_steps):
        rng, _ = _rng(cfg.seed, 2, step, rank)
        batch = _sample_dat_batch(sess_k, tok_k, ends_k, rng, cfg, model_config)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg.dat_steps, cfg.dat_lr, cfg.warmup_steps)
        logits, mean, std = ddp(batch)
        targets = batch.targets
        ce = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none")
        per_head = ce.view(targets.shape).mean(dim=(0, 1, 2))
        loss = per_head.mean()
        record = {"next_token_ce": float(per_head[0].detach())}
        if mean is not None and std is not None:
            err = mean - batch.future
            mse = err.pow(2).mean()
            # The s.d. learns the residual it is given; its gradient never moves the mean.
            nll = (std.log() + 0.5 * (err.detach() / std).pow(2)).mean()
            loss = loss + cfg.forecast_weight * mse + cfg.nll_weight * nll
            copy_mse = (batch.future - batch.context[..., -1:]).pow(2).mean()
            record["forecast_score"] = 1.0 - float(mse.detach()) / max(float(copy_mse), 1e-12)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
        opt.step()
        seen += batch.inputs.numel()
        bar.set_postfix(
            **{k_: f"{v:.3f}" for k_, v in record.items()},
            tok_s=f"{seen / (time.perf_counter() - t0):,.0f}",
            refresh=False,
        )
        bar.update(1)
        if (step + 1) % log_every == 0:
            state["history"].append(
                {"stage": "dat", "step": step + 1, "loss": float(loss.detach()), **record}
            )
        state["step"] = step + 1
        if (
            checkpoint is not None
            and rank == 0
            and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.dat_steps)
        ):
            checkpoint(opt)
    bar.close()
    trained.eval()


def pretrain_dat(
    model: CalM,
    sessions: Sequence[PreparedSession],
    train_config: TrainConfig | None = None,
    progress: bool = True,
) -> CalM:
    """Stage 2 of :func:`pretrain` alone: train ``model``'s DAT, its tokenizer frozen.

    For ablations that must share one tokenizer (same tokens, other DAT).
    Trains in place and returns the model in eval mode.
    """
    cfg = train_config or TrainConfig()
    state: dict[str, Any] = {"stage": "dat", "step": 0, "history": []}
    _train_dat(model, sessions, cfg, state, None, None, progress)
    return model.eval()


def adapt(
    model: CalM,
    sessions: Sequence[PreparedSession],
    steps: int = 300,
    lr: float = 5e-4,
    seed: int = 0,
    progress: bool = True,
) -> CalM:
    """Fine-tune a copy of the DAT on the training frames of ``sessions`` (tokenizer frozen).

    The same next-token objective as pretraining, on exactly the data the
    baselines are fitted on, so the comparison is like for like.
    """
    import copy

    tuned = copy.deepcopy(model)
    cfg = TrainConfig(dat_steps=steps, dat_lr=lr, warmup_steps=min(50, steps // 5 + 1), seed=seed)
    state: dict[str, Any] = {"stage": "dat", "step": 0, "history": []}
    _train_dat(tuned, sessions, cfg, state, None, None, progress, desc="adapt")
    tuned.eval()
    return tuned


@torch.no_grad()
def _restart_dead_codes(
    tok: nn.Module, counts: Tensor, x: Tensor, rng: np.random.Generator
) -> None:
    """Move codes unused since the last restart onto encodings of random windows."""
    rank, world = _world()
    if world > 1:
        dist.all_reduce(counts)
    dead = torch.nonzero(counts == 0).flatten()
    if dead.numel() and rank == 0:
        z = tok(x)
        pick = torch.from_numpy(
            rng.choice(z.shape[0], size=dead.numel(), replace=dead.numel() > z.shape[0])
        )
        tok.codebook[dead] = z[pick] + 0.01 * torch.randn_like(z[pick])
    if world > 1:
        dist.broadcast(tok.codebook.data, src=0)


def _summary(state: dict[str, Any]) -> dict[str, Any]:
    hist = state.get("history", [])
    tok = [h for h in hist if h["stage"] == "tokenizer"]
    dat = [h for h in hist if h["stage"] == "dat"]
    return {
        "train_config": state.get("train_config"),
        "world_size": state.get("world_size"),
        "data": state.get("data"),
        "tokenizer_final": tok[-1] if tok else None,
        "dat_final": dat[-1] if dat else None,
    }
