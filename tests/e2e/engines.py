"""How the end-to-end tests build vLLM engines and read their tokens."""

from vllm import LLM

# fp32 so that tokens can be compared exactly with the fp32 reference loops.
ENGINE_DEFAULTS = dict(
    dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=16, seed=0
)


def make_llm(model_dir, **kwargs) -> LLM:
    return LLM(model=str(model_dir), **{**ENGINE_DEFAULTS, **kwargs})


def token_prompts(prompts: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": p} for p in prompts]


def generate_ids(llm: LLM, prompts: list[list[int]], params) -> list[list[int]]:
    """Output token ids of each prompt (params: one SamplingParams or one per prompt)."""
    outs = llm.generate(token_prompts(prompts), params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]
