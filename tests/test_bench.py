"""Benchmarks run end to end on tiny inputs and write their JSON (numbers are checked by people, not here)."""

from __future__ import annotations

import json

from potstill.capture.prompts import Prompt


def test_bench_generate_tiny(tmp_path, tiny_model_dir):
    from potstill.bench.generate import bench_generate, format_table
    from potstill.teachers.hf import HFTeacher

    teacher = HFTeacher.load(str(tiny_model_dir), dtype="float32")
    prompts = [Prompt([{"role": "user", "content": f"Count to {i}."}]) for i in range(6)]
    out = tmp_path / "gen.json"
    res = bench_generate(teacher, prompts, max_new_tokens=6, batch_size=3, k=4, naive_prompts=2,
                         out_json=str(out), log=lambda *_: None)
    names = [r["decoder"].split(" (")[0] for r in res["results"]]
    assert names == ["hf-naive", "hf-batched+logprobs", "potstill", "potstill score", "potstill int8", "potstill int8"]
    int8 = res["results"][4:]  # layers, then layers + head: their tokens/s and KL to the float32 engine
    assert [r["decoder"] for r in int8] == ["potstill int8 (layers)", "potstill int8 (layers + head)"]
    assert all(r["kl_topk_vs_fp32"] > 0 and r["kl_tokens"] == res["results"][2]["tokens"] for r in int8)
    assert [r["generate_uses"] for r in int8] == [True, False]
    assert res["results"][3]["tokens"] == res["results"][2]["tokens"]  # scored exactly what was written
    assert teacher.model.config._attn_implementation == "potstill_cpu"  # restored after the stock anchors
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in res["results"])
    assert json.loads(out.read_text())["results"][1]["vs_anchor"] == 1.0
    assert "potstill int8 (layers + head)" in format_table(res) and "top-4 KL vs fp32" in format_table(res)
    import torch

    cpu = json.loads(out.read_text())["cpu"]  # the CPU's kernel capability and native bf16, in JSON and table
    assert cpu["capability"] == torch.backends.cpu.get_cpu_capability() and isinstance(cpu["bf16"], bool)
    assert f"CPU {cpu['capability']}, {'bf16' if cpu['bf16'] else 'no bf16'}" in format_table(res)


def test_bench_codec_small(tmp_path):
    from potstill.bench.codec import bench_codec

    res = bench_codec(n_positions=256, vocab=1000, k=8, out_json=str(tmp_path / "c.json"))
    assert (tmp_path / "c.json").exists()
    text = json.dumps(res)
    assert "mass" in text and "f16" in text


def test_bench_serve_tiny(tmp_path, tiny_model_dir):
    """Served (real uvicorn app, concurrent clients, a seed each) and local runs decode the same tokens."""
    from potstill.bench.serve import bench_serve, format_table
    from potstill.teachers.hf import HFTeacher

    teacher = HFTeacher.load(str(tiny_model_dir), dtype="float32")
    prompts = [Prompt([{"role": "user", "content": f"Count to {i}."}]) for i in range(8)]
    res = bench_serve(teacher, prompts, max_new_tokens=6, batch_size=4, clients=8, rounds=1,
                      out_json=str(tmp_path / "serve.json"), log=lambda *_: None)
    local, served = res["results"]
    assert local["runs"][0]["tokens"] == served["runs"][0]["tokens"] > 0  # same seeds, same completions
    assert res["server_batches"]["max_rows"] > 1  # the concurrent requests shared batches
    assert json.loads((tmp_path / "serve.json").read_text())["served_vs_local"] > 0
    assert "served / local" in format_table(res)
