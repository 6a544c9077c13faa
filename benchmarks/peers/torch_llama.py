"""jaxbig's Llama trained in PyTorch eager: the peer issue 9 compares jaxbig against.

The same architecture as `jaxbig.models.llama` (and `benchmarks/handwritten.py`): token
embedding, L blocks of [RMSNorm -> attention with rotate-half RoPE, causal, grouped-query when
N < H -> residual, RMSNorm -> SwiGLU MLP -> residual], final RMSNorm, an untied output head,
mean cross-entropy. Bias-free, float32, every weight matrix initialised normal(0, 0.02),
norm scales ones. The optimizer is jaxbig's default: global-norm clipping at 1.0, then AdamW
(b1 0.9, b2 0.95, eps 1e-8, decoupled weight decay 0.1 on matrices only, not on norm scales)
on linear warmup + cosine decay to 0.1x the peak. Attention is
`F.scaled_dot_product_attention(is_causal=True)`: what a PyTorch user writes.

Data: the bytes of the Python standard library's source files (the corpus jaxbig trains on
by default), documents separated by byte 0, cut into random windows of T+1; all batches are
drawn before the clock starts. Timing: CPU eager is synchronous, and each step ends with
`loss.item()`; per-step wall times after `--warmup-steps` steps. The FLOP count is
`ModelConfig.flops_per_token`, copied into `benchmarks/peers/shapes.py`.

    python benchmarks/peers/torch_llama.py --d-model 256 --layers 4 --heads 4 --kv-heads 4 \
        --head-dim 64 --d-ff 768 --vocab 256 --seq-len 256 --batch 16 --steps 30 --warmup-steps 3

Letters: B batch, T sequence, D d_model, H heads, N kv heads, K head dim, F d_ff, V vocab.
"""

import time

_PROCESS_START = time.perf_counter()  # before torch is imported: time to first step counts the import

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere: find `benchmarks`
from benchmarks.peers.shapes import Shape  # noqa: E402

# ------------------------------------------------------------------------------------ model


def rope_tables(T: int, K: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """sin, cos [T, K/2] for positions 0..T-1."""
    inv_freq_k = theta ** (-torch.arange(0, K, 2, dtype=torch.float32) / K)
    angles_Tk = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq_k[None, :]
    return angles_Tk.sin(), angles_Tk.cos()


def apply_rope(x_BHTK: torch.Tensor, sin_Tk: torch.Tensor, cos_Tk: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Llama/HF convention, as jaxbig)."""
    x1, x2 = x_BHTK.chunk(2, dim=-1)
    return torch.cat([x1 * cos_Tk - x2 * sin_Tk, x2 * cos_Tk + x1 * sin_Tk], dim=-1)


class Attention(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.H, self.N, self.K = s.num_heads, s.num_kv_heads, s.head_dim
        self.wq = nn.Linear(s.d_model, self.H * self.K, bias=False)
        self.wk = nn.Linear(s.d_model, self.N * self.K, bias=False)
        self.wv = nn.Linear(s.d_model, self.N * self.K, bias=False)
        self.wo = nn.Linear(self.H * self.K, s.d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor, sin_Tk: torch.Tensor, cos_Tk: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTK = self.wq(x_BTD).view(B, T, self.H, self.K).transpose(1, 2)
        k_BNTK = self.wk(x_BTD).view(B, T, self.N, self.K).transpose(1, 2)
        v_BNTK = self.wv(x_BTD).view(B, T, self.N, self.K).transpose(1, 2)
        q_BHTK, k_BNTK = apply_rope(q_BHTK, sin_Tk, cos_Tk), apply_rope(k_BNTK, sin_Tk, cos_Tk)
        # query head h reads kv head h // (H/N), as jaxbig's reshape to [N, G]
        out_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BNTK, v_BNTK, is_causal=True, enable_gqa=self.N < self.H)
        return self.wo(out_BHTK.transpose(1, 2).reshape(B, T, self.H * self.K))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, s: Shape):
        super().__init__()
        self.gate = nn.Linear(s.d_model, s.d_ff, bias=False)
        self.up = nn.Linear(s.d_model, s.d_ff, bias=False)
        self.down = nn.Linear(s.d_ff, s.d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x_BTD)) * self.up(x_BTD))


class Block(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.attn_norm = nn.RMSNorm(s.d_model, eps=s.norm_eps)
        self.attn = Attention(s)
        self.mlp_norm = nn.RMSNorm(s.d_model, eps=s.norm_eps)
        self.mlp = MLP(s)

    def forward(self, x_BTD, sin_Tk, cos_Tk):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), sin_Tk, cos_Tk)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class Llama(nn.Module):
    """`forward(tokens_BT) -> logits_BTV`."""

    def __init__(self, s: Shape, max_seq_len: int):
        super().__init__()
        self.embed = nn.Embedding(s.vocab_size, s.d_model)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.num_layers))
        self.final_norm = nn.RMSNorm(s.d_model, eps=s.norm_eps)
        self.lm_head = None if s.tie_embeddings else nn.Linear(s.d_model, s.vocab_size, bias=False)
        sin_Tk, cos_Tk = rope_tables(max_seq_len, s.head_dim, s.rope_theta)
        self.register_buffer("sin_Tk", sin_Tk, persistent=False)
        self.register_buffer("cos_Tk", cos_Tk, persistent=False)
        for p in self.parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, std=s.init_std)

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        T = tokens_BT.shape[1]
        sin_Tk, cos_Tk = self.sin_Tk[:T], self.cos_Tk[:T]
        x_BTD = self.embed(tokens_BT)
        for block in self.blocks:
            x_BTD = block(x_BTD, sin_Tk, cos_Tk)
        x_BTD = self.final_norm(x_BTD)
        return self.lm_head(x_BTD) if self.lm_head is not None else x_BTD @ self.embed.weight.T


# -------------------------------------------------------------------------------- optimizer


def make_optimizer(model: nn.Module, *, lr: float, warmup: int, total_steps: int, min_lr_ratio: float = 0.1):
    """jaxbig's default AdamW, decay on matrices only, on optax's warmup_cosine_decay_schedule."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8
    )
    decay_steps = max(total_steps, warmup + 1)

    def factor(step: int) -> float:  # the update with count `step` (0-based), as optax counts
        if step < warmup:
            return step / warmup
        frac = min(step - warmup, decay_steps - warmup) / (decay_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ------------------------------------------------------------------------------------- data


def stdlib_bytes(max_bytes: int) -> np.ndarray:
    """The stdlib's .py files in sorted order, each followed by byte 0 (jaxbig's eos), up to `max_bytes`."""
    root = Path(os.path.dirname(os.__file__))
    parts, total = [], 0
    for f in sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts):
        data = f.read_bytes()
        if not data or b"\x00" in data:
            continue
        parts += [np.frombuffer(data, np.uint8), np.zeros(1, np.uint8)]
        total += len(data) + 1
        if total >= max_bytes:
            break
    return np.concatenate(parts)


def draw_batches(data: np.ndarray, n: int, B: int, T: int, seed: int) -> list[torch.Tensor]:
    """`n` batches of B random windows of T+1 tokens, int64 [B, T+1]."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(data) - T - 1, size=(n, B))
    windows = data[starts[..., None] + np.arange(T + 1)]
    return [torch.from_numpy(w.astype(np.int64)) for w in windows]


# ------------------------------------------------------------------------------------- main


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of one n x n float32 matmul in torch, with the same threads."""
    a = torch.ones(n, n)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2.0 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--d-ff", type=int, default=768)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30, help="timed steps, after the warm-up")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (the first one is always untimed)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps torch's default")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (jaxbig's OptimConfig default)")
    p.add_argument("--lr-warmup", type=int, default=20, help="learning-rate warmup steps (jaxbig's default)")
    p.add_argument("--data-mib", type=float, default=4.0, help="MiB of stdlib source to draw windows from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32",
        help="compute dtype: bfloat16 runs the forward under torch.autocast('cpu') (params, grads and AdamW stay float32), "
        "PyTorch's mixed precision, as jaxbig's model.dtype=bfloat16",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    s = Shape(
        vocab_size=args.vocab,
        d_model=args.d_model,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        d_ff=args.d_ff,
    )
    B, T = args.batch, args.seq_len
    total = args.warmup_steps + args.steps
    data = stdlib_bytes(int(args.data_mib * 2**20))
    batches = draw_batches(data, total, B, T, args.seed)

    model = Llama(s, max_seq_len=T)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != s.num_params():
        raise AssertionError(f"torch model has {n_params:,} params, jaxbig's formula says {s.num_params():,}")
    opt, sched = make_optimizer(model, lr=args.lr, warmup=args.lr_warmup, total_steps=total)

    def step(batch_BT1: torch.Tensor) -> float:
        inputs_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            logits_BTV = model(inputs_BT)
        loss = F.cross_entropy(logits_BTV.float().reshape(-1, s.vocab_size), targets_BT.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return loss.item()

    losses, step_s = [], []
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        losses.append(step(batch))
        dt = time.perf_counter() - t
        if i == 0:
            first_step_s = time.perf_counter() - _PROCESS_START
        if i >= max(args.warmup_steps, 1):
            step_s.append(dt)
    if not step_s:
        raise SystemExit(f"--steps={args.steps} after --warmup-steps={args.warmup_steps} left no timed step")

    flops = s.flops_per_token(T)
    med = statistics.median(step_s)
    qs = statistics.quantiles(step_s, n=10, method="inclusive") if len(step_s) > 1 else [med] * 9
    tokens_per_s = B * T / med
    result = {
        "peer": "pytorch-eager",
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {**vars(s), "seq_len": T, "batch": B, "lr": args.lr, "lr_warmup": args.lr_warmup, "dtype": args.dtype},
        "data": f"python stdlib source bytes ({len(data) / 2**20:.1f} MiB), random windows",
        "num_params": n_params,
        "tokens_per_s": tokens_per_s,
        "step_s_median": med,
        "step_s_p10": qs[0],
        "step_s_p90": qs[-1],
        "step_s_min": min(step_s),
        "step_s_max": max(step_s),
        "step_s_all": [round(x, 4) for x in step_s],  # on a shared machine, the spread shows other load
        "first_step_s": first_step_s,
        "flops_per_token": flops,
        "gflops_per_s": tokens_per_s * flops / 1e9,
        "matmul_peak_gflops": matmul_peak() / 1e9,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "steps": len(step_s),
        "warmup_steps": args.warmup_steps,
        "load_avg_1m": os.getloadavg()[0],
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"pytorch-eager D={s.d_model} L={s.num_layers} H={s.num_heads} B={B} T={T}: {tokens_per_s:,.0f} tokens/s, "
        f"step {med * 1e3:.1f} ms (p10 {qs[0] * 1e3:.1f}, p90 {qs[-1] * 1e3:.1f}), {result['gflops_per_s']:.1f} GFLOP/s, "
        f"first step {first_step_s:.2f} s, peak RSS {result['peak_rss_mib']:.0f} MiB, loss {losses[0]:.3f} -> {losses[-1]:.3f}",
        file=sys.stderr,
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
