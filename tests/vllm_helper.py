"""Runs inside .venv-vllm for tests/test_vllm.py: vLLM's offline API, or the real `openai` client against a server.

    python vllm_helper.py offline MODEL_DIR CASES.json OUT.json
    python vllm_helper.py client BASE_URL MODEL_DIR CASES.json OUT.json

CASES.json: [{"name", "messages" (OpenAI chat format; images as data URLs), "max_tokens"}]. OUT.json: per case the
greedy token ids and the log-probability of each of them, and (offline) the prompt's token ids.
"""

from __future__ import annotations

import json
import sys


def offline(model: str, cases: list[dict]) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model, dtype="float32", max_model_len=2048, max_num_seqs=4, enforce_eager=True, gpu_memory_utilization=0.1,
        limit_mm_per_prompt={"image": 1},
    )  # fmt: skip
    results = {}
    for case in cases:
        params = SamplingParams(temperature=0.0, max_tokens=case["max_tokens"], logprobs=1)
        out = llm.chat(case["messages"], params, use_tqdm=False)[0]
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        results[case["name"]] = {
            "prompt_ids": list(out.prompt_token_ids),
            "ids": ids,
            "logprobs": [step[token].logprob for step, token in zip(completion.logprobs, ids)],
        }
    return results


def client(base_url: str, model: str, cases: list[dict]) -> dict:
    from openai import OpenAI

    api = OpenAI(base_url=base_url, api_key="unused")
    results = {}
    for case in cases:
        response = api.chat.completions.create(
            model=model, messages=case["messages"], temperature=0.0, max_tokens=case["max_tokens"], logprobs=True, top_logprobs=1,
            extra_body={"return_tokens_as_token_ids": True},
        )  # fmt: skip
        steps = response.choices[0].logprobs.content
        results[case["name"]] = {
            "ids": [int(step.token.removeprefix("token_id:")) for step in steps],
            "logprobs": [step.logprob for step in steps],
            "text": response.choices[0].message.content,
            "finish_reason": response.choices[0].finish_reason,
        }
    return results


def main(argv: list[str]) -> None:
    mode, *args = argv
    *run_args, cases_file, out_file = args
    with open(cases_file) as f:
        cases = json.load(f)
    results = offline(*run_args, cases) if mode == "offline" else client(*run_args, cases)
    with open(out_file, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":  # vLLM starts its engine in spawned processes, which re-import this file
    main(sys.argv[1:])
