"""One experiment: python exp.py BACKEND FMT  -> /tmp/qexp/results/BACKEND_FMT.json"""
import json, os, sys, time, traceback, statistics, warnings
import torch, torch.nn as nn

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

BACKEND, FMT = sys.argv[1], sys.argv[2]
OUT = f"/tmp/qexp/results/{BACKEND}_{FMT}.json"
TINY = "/tmp/qexp/tiny"
CFG = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
           tie_word_embeddings=False)
LIN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R = {"backend": BACKEND, "fmt": FMT, "errors": []}


def dump():
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    json.dump(R, open(OUT, "w"), indent=1, default=str)


def build(dtype=torch.float32):
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**CFG)).to(dtype)
    if not os.path.exists(TINY):
        m.save_pretrained(TINY)
    return m


def targets(model):
    return [(n, m) for n, m in model.named_modules() if n.split(".")[-1] in LIN and "lora" not in n]


def set_module(model, name, new):
    p, c = name.rsplit(".", 1)
    setattr(model.get_submodule(p), c, new)


# ---------- byte accounting -------------------------------------------------
def tensor_bytes(obj, seen, depth=0):
    if depth > 6 or obj is None:
        return 0
    if not isinstance(obj, torch.Tensor):
        if ("obj", id(obj)) in seen:
            return 0
        seen.add(("obj", id(obj)))
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__"):  # wrapper subclass (torchao, quanto)
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen, depth + 1) for n in names)
        tot = 0
        try:
            st = obj.untyped_storage()
            key = st.data_ptr()
            if key not in seen and st.nbytes() > 0:
                seen.add(key)
                tot += st.nbytes()
        except Exception:
            pass
        if type(obj) not in (torch.Tensor, nn.Parameter):  # bnb Params4bit/Int8Params carry extras
            tot += tensor_bytes(obj.__dict__, seen, depth + 1)
        return tot
    if isinstance(obj, nn.Module):
        tot = 0
        depth = -1  # modules do not consume depth
        for v in list(obj._parameters.values()) + list(obj._buffers.values()):
            tot += tensor_bytes(v, seen, depth + 1)
        for k, v in obj.__dict__.items():
            if k.startswith("_") or isinstance(v, nn.Module):
                continue
            tot += tensor_bytes(v, seen, depth + 1)
        for c in obj.children():
            tot += tensor_bytes(c, seen, depth + 1)
        return tot
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("bitsandbytes", "hqq", "optimum", "torchao"):
        return tensor_bytes(obj.__dict__, seen, depth + 1)
    return 0


def lin_bytes(model):
    seen = set()
    tot = 0
    for n, m in targets(model):
        base = m.get_base_layer() if hasattr(m, "get_base_layer") else m
        tot += tensor_bytes(base, seen)
    return tot


def model_bytes(model):
    return tensor_bytes(model, set())


def wtype(model):
    n, m = targets(model)[0]
    base = m.get_base_layer() if hasattr(m, "get_base_layer") else m
    w = getattr(base, "weight", None)
    if w is None:
        w = getattr(base, "W_q", None)
    return f"{type(base).__name__}/{type(w).__name__}/{getattr(w, 'dtype', None)}"


# ---------- quantizers -------------------------------------------------------
def is_target(m, fqn):
    return isinstance(m, nn.Linear) and fqn.split(".")[-1] in LIN


def quantize(backend, fmt):
    """returns quantized model (fp32 activations)"""
    if backend == "none":
        return build(torch.bfloat16 if fmt == "bf16" else torch.float32)
    if backend == "torchao":
        import torchao
        from torchao.quantization import quantize_
        R["version"] = torchao.__version__
        m = build()
        if fmt == "int8":
            from torchao.quantization import Int8WeightOnlyConfig
            quantize_(m, Int8WeightOnlyConfig(), filter_fn=is_target)
        elif fmt == "int4":  # Int4WeightOnlyConfig (needs bf16)
            from torchao.quantization import Int4WeightOnlyConfig
            m = m.to(torch.bfloat16)
            quantize_(m, Int4WeightOnlyConfig(group_size=128), filter_fn=is_target)
        elif fmt == "intx4":
            from torchao.quantization import IntxWeightOnlyConfig
            from torchao.quantization.granularity import PerGroup
            quantize_(m, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)), filter_fn=is_target)
        elif fmt == "intx4k":  # packed int4 for ATen CPU (KleidiAI) kernels
            from torchao.quantization import IntxWeightOnlyConfig
            from torchao.quantization.granularity import PerGroup
            from torchao.quantization.quantize_.workflows import IntxPackingFormat
            quantize_(m, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64),
                      intx_packing_format=IntxPackingFormat.OPAQUE_ATEN_KLEIDIAI), filter_fn=is_target)
        elif fmt == "nf4":
            from torchao.quantization import to_nf4
            for n, lin in targets(m):
                lin.weight = nn.Parameter(to_nf4(lin.weight.data, block_size=64, scaler_block_size=256), requires_grad=False)
        return m
    if backend == "bnb":
        import bitsandbytes as bnb
        R["version"] = bnb.__version__
        if fmt in ("int8", "nf4"):  # via transformers BitsAndBytesConfig
            from transformers import BitsAndBytesConfig
            build()
            qc = (BitsAndBytesConfig(load_in_8bit=True) if fmt == "int8" else
                  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_compute_dtype=torch.float32))
            return LlamaForCausalLM.from_pretrained(TINY, quantization_config=qc, device_map="cpu", dtype=torch.float32)
        m = build()
        for n, lin in targets(m):  # manual module replacement
            if fmt == "int8m":
                new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False, threshold=0.0)
                new.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4")
                new.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
            set_module(m, n, new.to("cpu"))
        return m
    if backend == "quanto":
        from optimum.quanto import quantize as qq, freeze, qint8, qint4
        import optimum.quanto as oq
        R["version"] = getattr(oq, "__version__", "?")
        m = build()
        qq(m, weights=qint8 if fmt == "int8" else qint4, exclude=["lm_head"])
        freeze(m)
        return m
    if backend == "hqq":
        import hqq
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, HQQBackend
        R["version"] = getattr(hqq, "__version__", "?")
        HQQLinear.set_backend(HQQBackend.PYTORCH)
        m = build()
        qc = BaseQuantizeConfig(nbits=8 if fmt == "int8" else 4, group_size=64, axis=1)
        for n, lin in targets(m):
            set_module(m, n, HQQLinear(lin, qc, compute_dtype=torch.float32, device="cpu"))
        return m
    raise ValueError(backend)


# ---------- LoRA helpers -----------------------------------------------------
def wrap(model):
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none")
    pm = get_peft_model(model, cfg)
    lora = sorted((n, p) for n, p in pm.named_parameters() if "lora_" in n)
    for i, (n, p) in enumerate(lora):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    return pm, lora


def batch(b, l, seed):
    return torch.randint(0, CFG["vocab_size"], (b, l), generator=torch.Generator().manual_seed(seed))


def grads(pm, lora, ids):
    pm.zero_grad(set_to_none=True)
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.detach().float().clone() for n, p in lora}


def relerr(ga, gb):
    num = sum(((ga[k] - gb[k]) ** 2).sum() for k in gb)
    den = sum((gb[k] ** 2).sum() for k in gb)
    per = max(((ga[k] - gb[k]).norm() / gb[k].norm()).item() for k in gb)
    return (num / den).sqrt().item(), per


def eff_weights(model):
    """W_eff of each quantized target via identity probe: module(I) = I @ W^T."""
    W = {}
    with torch.no_grad():
        for n, m in targets(model):
            in_f = getattr(m, "in_features", None) or m.meta["shape"][1]
            eye = torch.eye(in_f, dtype=torch.float32)
            W[n] = m(eye).float().T.contiguous()
    return W


# ---------- main -------------------------------------------------------------
def main():
    ids = batch(4, 64, 1)
    # fp32 reference
    ref = build()
    ref_bytes = lin_bytes(ref)
    R["fp32_linear_bytes"] = ref_bytes
    R["fp32_model_bytes"] = model_bytes(ref)
    pref, lref = wrap(ref)
    _, g_ref = grads(pref, lref, ids)
    del pref, ref

    stage = "quantize"
    try:
        t0 = time.time()
        q = quantize(BACKEND, FMT)
        q.train()  # bnb Linear4bit repacks weights for CPU inference when not training (breaks grads)
        R["quantize_s"] = round(time.time() - t0, 2)
        R["installs"] = True
        R["weight_type"] = wtype(q)
        R["linear_bytes"] = lin_bytes(q)
        R["model_bytes"] = model_bytes(q)
        R["bytes_ratio_vs_fp32"] = round(R["linear_bytes"] / ref_bytes, 4)
        if BACKEND != "none":
            stage = "eff_weights"
            try:
                W = eff_weights(q)
            except Exception as e:
                W = None
                R["errors"].append(f"eff_weights: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        stage = "peft_wrap"
        pm, lora = wrap(q)
        R["peft_wraps"] = True
        R["lora_layer_type"] = type(pm.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")).__name__
        R["trainable_params"] = sum(p.numel() for _, p in lora)
        stage = "backward"
        loss0, g_q = grads(pm, lora, ids)
        R["backward_ok"] = all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in g_q.values())
        R["loss0"] = loss0
        R["grad_relerr_vs_fp32"], R["grad_relerr_vs_fp32_maxtensor"] = relerr(g_q, g_ref)
        if BACKEND != "none" and W is not None:
            # fp32 model holding the dequantized (effective) weights: isolates kernel/backward numerics
            d = build()
            with torch.no_grad():
                for n, lin in targets(d):
                    lin.weight.copy_(W[n])
            pd, ld = wrap(d)
            _, g_d = grads(pd, ld, ids)
            R["grad_relerr_vs_dequant_fp32"], _ = relerr(g_q, g_d)
            w0 = targets(build())
            R["weight_relerr_quant"] = (sum(((W[n] - l.weight) ** 2).sum() for n, l in w0) /
                                        sum((l.weight ** 2).sum() for n, l in w0)).sqrt().item()
            del d, pd
        stage = "train"
        opt = torch.optim.AdamW([p for _, p in lora], lr=5e-3)
        losses = []
        for _ in range(6):
            opt.zero_grad(set_to_none=True)
            loss = pm(input_ids=ids, labels=ids).loss
            losses.append(round(loss.item(), 5))
            loss.backward()
            opt.step()
        R["losses"] = losses
        R["loss_decreases"] = losses[-1] < losses[0] - 1e-3
        R["weight_type_after_train"] = wtype(pm)
        R["linear_bytes_after_train"] = lin_bytes(pm)
        R["base_requires_grad_any"] = any(p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n)
        stage = "timing"
        big = batch(8, 256, 2)
        ts = []
        for i in range(4):
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            pm(input_ids=big, labels=big).loss.backward()
            ts.append(time.perf_counter() - t0)
        R["step_times_s"] = [round(t, 3) for t in ts]
        R["step_time_s"] = round(statistics.median(ts[1:]), 3)
    except Exception as e:
        R.setdefault("installs", stage != "quantize")
        msg = str(e).strip().splitlines()
        R["errors"].append(f"{stage}: {type(e).__name__}: {msg[0] if msg else ''}"[:400])
        R["traceback"] = traceback.format_exc()[-3000:]
    dump()


main()
