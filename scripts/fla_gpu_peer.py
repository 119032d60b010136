#!/usr/bin/env python3
"""chunkc's CUDA kernels against flash-linear-attention's Triton kernels on the same inputs.

    python3 scripts/fla_gpu_peer.py CHUNKC_BIN [B,T,H,K,V] [rules...]

For each rule (simple_gla, gla, gated_delta_rule, kda by default): draws inputs on the GPU in
FLA's conventions (l2-normalised keys for the delta rules, log-sigmoid gates, sigmoid beta,
h0), times FLA's chunk kernel with CUDA events (bf16 inputs, as FLA runs them), writes the
same inputs (rounded to bf16, stored as f32) to a safetensors file, runs `chunkc run
--backend cuda --dtype bf16 --dot bf16` on it and prints the relative RMS error between the
two outputs, then `chunkc bench --backend cuda` at the same shape and precision; last, the
ratio FLA / chunkc. Needs torch with CUDA and flash-linear-attention; a rule whose FLA call
fails is reported and skipped. Used by scripts/gpu_check.sh.
"""
import json, os, struct, subprocess, sys, tempfile

import torch
import torch.nn.functional as F


def save_safetensors(path, tensors):
    header, blobs, at = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().float().contiguous().cpu().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [at, at + len(data)]}
        blobs.append(data)
        at += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        raw = open(path, "rb").read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        assert meta["dtype"] == "F32", meta
        out[name] = torch.frombuffer(bytearray(raw[base + a:base + b]), dtype=torch.float32).reshape(meta["shape"])
    return out


def inputs(rule, B, T, H, K, V, g):
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    t = {"q": q, "v": v, "h0": r(B, H, K, V) * 0.1}
    if rule == "simple_gla":
        t.update(k=k, g=F.logsigmoid(r(B, T, H) + 3.0))
    elif rule == "gla":
        t.update(k=k, gk=F.logsigmoid(r(B, T, H, K) + 2.0) / 4)
    elif rule == "gated_delta_rule":
        t.update(k=F.normalize(k, dim=-1), g=F.logsigmoid(r(B, T, H) + 3.0), beta=torch.sigmoid(r(B, T, H)))
    elif rule == "kda":
        t.update(k=F.normalize(k, dim=-1), gk=F.logsigmoid(r(B, T, H, K) + 3.0), beta=torch.sigmoid(r(B, T, H)))
    else:
        raise ValueError(rule)
    # The bf16 values both sides read; h0 stays f32 (chunkc keeps states in f32).
    return {n: (x if n == "h0" else x.bfloat16()) for n, x in t.items()}


def fla_call(rule, t):
    h0 = t["h0"]
    if rule == "simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla
        return lambda: chunk_simple_gla(t["q"], t["k"], t["v"], t["g"], initial_state=h0, output_final_state=True)
    if rule == "gla":
        from fla.ops.gla import chunk_gla
        return lambda: chunk_gla(t["q"], t["k"], t["v"], t["gk"], initial_state=h0, output_final_state=True)
    if rule == "gated_delta_rule":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return lambda: chunk_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=h0,
                                              output_final_state=True)
    if rule == "kda":
        from fla.ops.kda import chunk_kda
        return lambda: chunk_kda(t["q"], t["k"], t["v"], t["gk"], t["beta"], initial_state=h0, output_final_state=True)
    raise ValueError(rule)


def cuda_ms(f, runs=20):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2], times[0]


def main():
    chunkc = sys.argv[1]
    shape = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "2,8192,16,128,128").split(",")]
    rules = sys.argv[3:] or ["simple_gla", "gla", "gated_delta_rule", "kda"]
    B, T, H, K, V = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="chunkc-fla-")
    print(f"shape B={B} T={T} H={H} K={K} V={V}, bf16 inputs; {torch.cuda.get_device_name(0)}")
    print(f"{'rule':<18} {'FLA ms':>9} {'chunkc ms':>10} {'FLA/chunkc':>11} {'rel RMS o':>10}")
    for rule in rules:
        t = inputs(rule, B, T, H, K, V, g)
        try:
            call = fla_call(rule, t)
            o_fla = call()[0].float()
            fla_med, _ = cuda_ms(call)
        except Exception as e:  # an FLA version without this kernel or signature
            print(f"{rule:<18} FLA failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        path_in, path_out = os.path.join(tmp, f"{rule}_in.safetensors"), os.path.join(tmp, f"{rule}_out.safetensors")
        save_safetensors(path_in, t)
        rule_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "rules", f"{rule}.toml")
        flags = ["--backend", "cuda", "--dtype", "bf16", "--dot", "bf16"]
        run = subprocess.run([chunkc, "run", rule_file, "--inputs", path_in, "--out", path_out, *flags],
                             capture_output=True, text=True)
        if run.returncode != 0:
            print(f"{rule:<18} {fla_med:>9.4f} chunkc run failed: {run.stderr.strip()}")
            continue
        o = load_safetensors(path_out)["o"].cuda()
        err = ((o - o_fla).pow(2).mean() / o_fla.pow(2).mean()).sqrt().item()
        bench = subprocess.run([chunkc, "bench", rule_file, "--shape", ",".join(map(str, shape)), "--runs", "20",
                                "--json", *flags], capture_output=True, text=True)
        if bench.returncode != 0:
            print(f"{rule:<18} {fla_med:>9.4f} chunkc bench failed: {bench.stderr.strip()}  rel RMS o {err:.2e}")
            continue
        ours = json.loads(bench.stdout)["median_ms"]
        print(f"{rule:<18} {fla_med:>9.4f} {ours:>10.4f} {fla_med / ours:>10.3f}x {err:>10.2e}")


if __name__ == "__main__":
    main()
