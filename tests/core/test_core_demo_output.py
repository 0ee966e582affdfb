"""The demo's own output says why the text is gibberish and why dlinfer is slower than stock vLLM on a CPU."""

from __future__ import annotations

from dlinfer.framework.vllm_ext import demo


def _result(seconds, tokens):
    return {"prompts": [demo.SYSTEM + p for p in demo.PROMPTS[:2]], "texts": ["x\x07y", "zz"],
            "token_ids": tokens, "output_tokens": 8, "generate_s": seconds, "load_s": 1.0,
            "report": {"pid": 1, "counts": {"rms_norm": 3}, "vendors": {"rms_norm": ["reference"]},
                       "registered": True}}


def test_demo_explains_gibberish_and_cpu_speed(capsys):
    ours, stock = _result(4.0, [[1, 2], [3, 4]]), _result(1.0, [[1, 2], [3, 5]])
    demo._print_result(ours, stock)
    out = capsys.readouterr().out
    assert "gibberish by design" in out and "random weights" in out
    assert "greedy tokens identical to stock vLLM for 1 of 2 prompts" in out
    speed = out.split("speed: ", 1)[1]
    assert speed.startswith("dlinfer at 0.25x stock here: on this CPU dlinfer's ops run on the 'reference' vendor")
    assert "benchmarks/RESULTS.md" in speed.split("\n\n", 1)[0]


def test_demo_without_compare_has_no_speed_line(capsys):
    demo._print_result(_result(4.0, [[1]]), None)
    out = capsys.readouterr().out
    assert "gibberish by design" in out and "speed:" not in out
