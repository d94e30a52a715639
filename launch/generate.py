"""Talk to a model you trained: `trainrig generate`, with the chat template and the answer
streamed token by token.

    trainrig generate --model_name_or_path outputs/sft/final/merged --prompt "Where does Velora Quennik live?"
    trainrig generate --model_name_or_path outputs/base/final --adapter_path outputs/sft/final      (interactive)
"""

from __future__ import annotations

import sys

from trainers.config import GenerateConfig, parse_config
from trainers.errors import exit_on_usage_error


def answer(model, renderer, messages: list[dict], args, stream) -> str:
    """One assistant turn for `messages` (reasoning included), written to `stream` as it is generated."""
    import torch
    from transformers import GenerationConfig, TextStreamer

    from trainers.evaluate import generation_prompt, stop_token_ids

    tokenizer = renderer.tokenizer
    ids = tokenizer(generation_prompt(renderer, messages), add_special_tokens=False, return_tensors="pt")["input_ids"]
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else {"do_sample": False}
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=stop_token_ids(renderer),
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                              **sampling)

    class Printer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    torch.manual_seed(args.seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(model.device), generation_config=config,
                             streamer=Printer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@exit_on_usage_error
def main(argv: list[str] | None = None, stdin=None, stdout=None) -> list[str]:
    """Answers to --prompt, or to every line typed at the prompt; returns them."""
    from trainers.data.templates import split_reasoning
    from trainers.evaluate import prompter
    from trainers.models import load_for_inference
    from trainers.runtime import InferenceRuntime

    cfg = parse_config(GenerateConfig, argv, prog="trainrig generate")
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    runtime = InferenceRuntime(cfg.generate.precision)
    model, tokenizer = load_for_inference(cfg.model, runtime.device, runtime.dtype, runtime.precision)
    renderer = prompter(tokenizer, cfg.generate.enable_thinking)  # a tokenizer saved without a template gets ChatML's, as in training
    history = [{"role": "system", "content": cfg.generate.system_prompt}] if cfg.generate.system_prompt else []
    answers = []
    interactive = not cfg.generate.prompt
    if interactive:
        stdout.write("chat with the model; an empty line or Ctrl-D ends\n")
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
            line = stdin.readline()
            if not line.strip():
                break
            history.append({"role": "user", "content": line.strip()})
            stdout.write("model> ")
        else:
            history.append({"role": "user", "content": cfg.generate.prompt})
        reply = answer(model, renderer, history, cfg.generate, stdout)
        final, reasoning = split_reasoning(reply, renderer.shape)  # the template decides whether later turns see the reasoning
        history.append({"role": "assistant", "content": final, **({"reasoning_content": reasoning} if reasoning else {})})
        answers.append(reply)
        if not interactive:
            break
    runtime.end()
    return answers


if __name__ == "__main__":
    main(sys.argv[1:])
