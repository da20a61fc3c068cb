"""Capture Q/K/V from a Hugging Face causal LM into a kvsieve trace.

Usage:
    pip install torch transformers safetensors
    python docs/capture_traces.py --model meta-llama/Llama-3.2-1B \
        --prompt-file prompt.txt --decode-steps 64 --out trace.safetensors
    cargo run --release --example eval -- --trace trace.safetensors

Writes tensors layers.{l}.q [T, Hq, D], layers.{l}.k / layers.{l}.v
[T, Hkv, D] (post-RoPE, float32) and the metadata entry prompt_len; see
docs/layouts.md ("Traces"). Works for Llama-style models whose attention
modules are `model.model.layers[i].self_attn` with q_proj / k_proj /
v_proj and the model's rotary embedding.
"""
import argparse

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-file", required=True)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--out", default="trace.safetensors")
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    model.eval()
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", cfg.hidden_size // hq)

    ids = tok(open(args.prompt_file).read(), return_tensors="pt").input_ids
    prompt_len = ids.shape[1]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.decode_steps, do_sample=False)
    ids = out[:, : prompt_len + args.decode_steps]
    t = ids.shape[1]

    captured = {}

    def hook(layer_idx):
        def fn(module, inputs, kwargs):
            x = kwargs.get("hidden_states", inputs[0] if inputs else None)
            cos, sin = kwargs["position_embeddings"]
            q = module.q_proj(x).view(1, t, hq, d).transpose(1, 2)
            k = module.k_proj(x).view(1, t, hkv, d).transpose(1, 2)
            v = module.v_proj(x).view(1, t, hkv, d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            captured[f"layers.{layer_idx}.q"] = q[0].transpose(0, 1).contiguous()
            captured[f"layers.{layer_idx}.k"] = k[0].transpose(0, 1).contiguous()
            captured[f"layers.{layer_idx}.v"] = v[0].transpose(0, 1).contiguous()

        return fn

    handles = [
        layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(ids)  # one teacher-forced pass over prompt + generated tokens
    for h in handles:
        h.remove()
    save_file(captured, args.out, metadata={"prompt_len": str(prompt_len)})
    print(f"wrote {args.out}: {len(model.model.layers)} layers, T = {t}, prompt {prompt_len}")


if __name__ == "__main__":
    main()
