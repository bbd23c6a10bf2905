"""Read and write HF ``transformers`` Mixtral checkpoint directories (config.json + safetensors).

Needs only ``safetensors``: ``transformers`` is a test dependency, used there to check logit parity.
Loading accepts both expert layouts found on disk: the classic per-expert
``block_sparse_moe.experts.{e}.w1/w2/w3`` names and the fused ``mlp.experts.gate_up_proj/down_proj``.
Saving writes the classic names, which every ``MixtralForCausalLM.from_pretrained`` reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moe_variants.model.args import ModelArgs
from moe_variants.model.routing import RouterFactory
from moe_variants.model.transformer import Transformer

_ATTN = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"}
_ATTN_TO_HF = {ours: hf for hf, ours in _ATTN.items()}


def args_from_hf_config(cfg: dict[str, Any]) -> ModelArgs:
    if cfg.get("model_type") not in (None, "mixtral"):
        raise ValueError(f"not a Mixtral checkpoint: config.json has model_type={cfg.get('model_type')!r}")
    rope = cfg.get("rope_parameters") or {}
    return ModelArgs(
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        hidden_dim=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        num_experts=cfg["num_local_experts"],
        num_experts_per_tok=cfg["num_experts_per_tok"],
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 1e6))),
        sliding_window=cfg.get("sliding_window"),
        max_seq_len=cfg.get("max_position_embeddings", 32768),
        init_std=cfg.get("initializer_range", 0.02),
    )


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype, bos_token_id: int = 1, eos_token_id: int = 2
                        ) -> dict[str, Any]:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "intermediate_size": args.hidden_dim,
        "vocab_size": args.vocab_size,
        "num_local_experts": args.num_experts,
        "num_experts_per_tok": args.num_experts_per_tok,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_theta": args.rope_theta, "rope_type": "default"},
        "sliding_window": args.sliding_window,
        "max_position_embeddings": args.max_seq_len,
        "initializer_range": args.init_std,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."),
    }


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no *.safetensors files (is it an HF Mixtral checkpoint directory?)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def _to_ours(hf: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Map HF names to this package's names; fuse per-expert weights into (E, ...) stacks."""
    ours: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, int, str], torch.Tensor] = {}
    unknown = []
    for name, t in hf.items():
        name = name.removeprefix("model.")
        if name == "embed_tokens.weight":
            ours["tok_embeddings.weight"] = t
        elif name == "norm.weight":
            ours["norm.weight"] = t
        elif name == "lm_head.weight":
            ours["output.weight"] = t
        elif m := re.fullmatch(r"layers\.(\d+)\.self_attn\.(\w+)_proj\.weight", name):
            ours[f"layers.{m[1]}.attention.{_ATTN[m[2] + '_proj']}.weight"] = t
        elif m := re.fullmatch(r"layers\.(\d+)\.input_layernorm\.weight", name):
            ours[f"layers.{m[1]}.attention_norm.weight"] = t
        elif m := re.fullmatch(r"layers\.(\d+)\.post_attention_layernorm\.weight", name):
            ours[f"layers.{m[1]}.ffn_norm.weight"] = t
        elif m := re.fullmatch(r"layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight", name):
            ours[f"layers.{m[1]}.feed_forward.router.gate.weight"] = t
        elif m := re.fullmatch(r"layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w[123])\.weight", name):
            experts[(int(m[1]), int(m[2]), m[3])] = t
        elif m := re.fullmatch(r"layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.gate_up_proj", name):
            ours[f"layers.{m[1]}.feed_forward.experts.w13"] = t
        elif m := re.fullmatch(r"layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.down_proj", name):
            ours[f"layers.{m[1]}.feed_forward.experts.w2"] = t
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"unrecognised tensors in the HF checkpoint (not Mixtral?): {unknown[:5]}")
    for layer in sorted({key[0] for key in experts}):
        try:
            w1 = torch.stack([experts[(layer, e, "w1")] for e in range(args.num_experts)])  # (E, F, D)
            w3 = torch.stack([experts[(layer, e, "w3")] for e in range(args.num_experts)])
            w2 = torch.stack([experts[(layer, e, "w2")] for e in range(args.num_experts)])  # (E, D, F)
        except KeyError as err:
            raise ValueError(f"layer {layer} lacks expert weight {err.args[0]} (config says "
                             f"{args.num_experts} experts)") from None
        ours[f"layers.{layer}.feed_forward.experts.w13"] = torch.cat([w1, w3], dim=1)
        ours[f"layers.{layer}.feed_forward.experts.w2"] = w2
    return ours


def load_state_dict_checked(model: Transformer, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with one clear message listing every missing, unexpected or mis-shaped tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source} does not match this model's config: "
            + "; ".join(part for part in (
                f"missing {len(missing)} tensors, e.g. {missing[:3]}" if missing else "",
                f"unexpected {len(unexpected)}, e.g. {unexpected[:3]}" if unexpected else "",
                f"shape mismatches: {shapes[:3]}" if shapes else "") if part)
        )
    model.load_state_dict(state)


def load_hf(
    path: str | Path, router: RouterFactory, experts: str = "loop", dtype: torch.dtype | None = None
) -> Transformer:
    """Load an HF Mixtral checkpoint directory into a :class:`Transformer`.

    ``router`` must build Mixtral's learned top-k gate (``moe_variants.routers.topk.TopKRouter``): HF's
    ``block_sparse_moe.gate`` weights load into its ``gate``. The model layer never imports a router, so the
    caller names it.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not an HF checkpoint directory: no config.json")
    args = args_from_hf_config(json.loads(config_file.read_text()))
    with torch.device("meta"):
        model = Transformer(args, router=router, experts=experts)
    bad = sorted({type(r).__name__ for r in model.routers if not r.hf_exportable})
    if bad:
        raise ValueError(f"an HF Mixtral checkpoint holds Mixtral's learned top-k gate; router {bad[0]} is not it: "
                         f"pass router=moe_variants.routers.topk.TopKRouter")
    state = _to_ours(_read_tensors(path), args)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.to_empty(device="cpu")
    model.init_rope()
    load_state_dict_checked(model, state, f"HF checkpoint {path}")
    return model


def save_hf(model: Transformer, path: str | Path, bos_token_id: int = 1, eos_token_id: int = 2) -> None:
    """Write ``model`` as a directory that ``transformers.MixtralForCausalLM.from_pretrained`` loads
    (``config.json`` + ``model.safetensors``; the ids are those of the tokenizer's BOS / EOS, Mixtral's by default).

    Only Mixtral's own learned top-k gate can be expressed in HF's format; hash, span and other routers
    (and their tables), other score functions, selection biases, shared experts and capacity dropping cannot, so
    such a model refuses to export. A complete folder with the run's tokenizer (``AutoTokenizer``, ``pipeline``):
    ``moe_variants.training.export.export_hf``.
    """
    args = model.args
    if args.num_shared_experts or args.capacity_factor is not None:
        raise ValueError(
            f"cannot export to HF Mixtral format: the model has num_shared_experts={args.num_shared_experts} and "
            f"capacity_factor={args.capacity_factor}, which Mixtral cannot express (it has no shared experts and "
            f"never drops tokens); export only a model with num_shared_experts=0 and capacity_factor=null"
        )
    bad = {type(r).__name__ for r in model.routers if not r.hf_exportable}
    if bad or any(getattr(r, "jitter_eps", 0.0) for r in model.routers):
        raise ValueError(
            f"cannot export to HF Mixtral format: routers {sorted(bad) or ['TopKRouter with jitter']} are not "
            f"Mixtral's learned top-k gate (HF's MixtralForCausalLM would silently route differently)"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out: dict[str, torch.Tensor] = {}
    F_ = model.args.hidden_dim
    for name, t in model.state_dict().items():
        t = t.detach().contiguous()
        if name == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "norm.weight":
            out["model.norm.weight"] = t
        elif name == "output.weight":
            out["lm_head.weight"] = t
        elif m := re.fullmatch(r"layers\.(\d+)\.attention\.(w[qkvo])\.weight", name):
            out[f"model.layers.{m[1]}.self_attn.{_ATTN_TO_HF[m[2]]}.weight"] = t
        elif m := re.fullmatch(r"layers\.(\d+)\.attention_norm\.weight", name):
            out[f"model.layers.{m[1]}.input_layernorm.weight"] = t
        elif m := re.fullmatch(r"layers\.(\d+)\.ffn_norm\.weight", name):
            out[f"model.layers.{m[1]}.post_attention_layernorm.weight"] = t
        elif m := re.fullmatch(r"layers\.(\d+)\.feed_forward\.router\.gate\.weight", name):
            out[f"model.layers.{m[1]}.block_sparse_moe.gate.weight"] = t
        elif m := re.fullmatch(r"layers\.(\d+)\.feed_forward\.experts\.(w13|w2)", name):
            prefix = f"model.layers.{m[1]}.block_sparse_moe.experts"
            for e in range(t.shape[0]):
                if m[2] == "w13":
                    out[f"{prefix}.{e}.w1.weight"] = t[e, :F_].contiguous()
                    out[f"{prefix}.{e}.w3.weight"] = t[e, F_:].contiguous()
                else:
                    out[f"{prefix}.{e}.w2.weight"] = t[e].contiguous()
        else:
            raise ValueError(f"no HF name for tensor {name}")
    dtype = next(model.parameters()).dtype
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config_from_args(model.args, dtype, bos_token_id, eos_token_id)
    (path / "config.json").write_text(json.dumps(config, indent=2))
