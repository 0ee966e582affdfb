"""Run one vLLM engine on a tiny model and write what the tests compare to a JSON file.

    python tests/vllm/engine_runner.py CASE.json OUT.json

Each end-to-end case runs this in its own process (vLLM pins threads and keeps global registries). The case
names the model, the ``LLM`` keyword arguments, rounds of token-id prompts and the sampling settings; the
environment (``DLINFER_VLLM``, ``VLLM_PLUGINS``, ``VLLM_ENABLE_V1_MULTIPROCESSING``...) is set by the caller.
The output holds, per prompt, the greedy tokens, the top-2 logprobs of every step and the prefix-cache hits,
and, from every process that ran the model, the dlinfer op counts and the classes that computed.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(case_path: str, out_path: str) -> int:
    with open(case_path) as f:
        case = json.load(f)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from dlinfer.framework.vllm_ext import counters

    llm = LLM(model=case["model"], **case["llm"])
    t_init = time.time() - t0
    params = SamplingParams(temperature=0.0, max_tokens=case["max_tokens"], ignore_eos=True,
                            logprobs=case.get("logprobs", 2))
    rounds = []
    t1 = time.time()
    for prompts in case["rounds"]:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        results = []
        for out in outs:
            completion = out.outputs[0]
            steps = []
            for token, step in zip(completion.token_ids, completion.logprobs or []):
                ranked = sorted(step.items(), key=lambda kv: kv[1].logprob, reverse=True)
                steps.append({"token": token, "top": [[tid, lp.logprob] for tid, lp in ranked[:2]]})
            results.append({"tokens": list(completion.token_ids), "steps": steps,
                            "num_cached_tokens": out.num_cached_tokens or 0})
        rounds.append(results)
    t_gen = time.time() - t1

    processes = llm.collective_rpc(counters.report)
    classes = llm.apply_model(counters.model_classes)
    result = {"rounds": rounds, "processes": processes, "classes": classes, "main_pid": os.getpid(),
              "main_counts": counters.snapshot(), "init_s": round(t_init, 2), "generate_s": round(t_gen, 2)}
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
