"""Talk to `examples/serve.sh` with the official OpenAI client.

    python examples/openai_client.py [--url http://127.0.0.1:8000]

Diffusion and SparseD parameters go in `extra_body={"vllm_xargs": {...}}`.
"""

import argparse

import openai


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key="unused")
    model = client.models.list().data[0].id

    completion = client.completions.create(
        model=model,
        prompt="The capital of France is",
        max_tokens=32,
        temperature=0,
        extra_body={"vllm_xargs": {"steps": 32, "block_length": 8, "sparsed": True}},
    )
    print("completion:", repr(completion.choices[0].text), completion.usage)

    print("streamed chat, one chunk per committed block:")
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=64,
        temperature=0,
        stream=True,
        extra_body={"vllm_xargs": {"steps": 64, "block_length": 16}},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print("  block:", repr(chunk.choices[0].delta.content))

    try:
        client.completions.create(
            model=model, prompt="x", max_tokens=30, extra_body={"vllm_xargs": {"block_length": 8}}
        )
    except openai.BadRequestError as exc:
        print("rejected as expected:", exc.message)


if __name__ == "__main__":
    main()
