"""GRPO with TRL's GRPOTrainer, end-to-end or with LoPT, fully offline, with a toy keyword reward.

    python examples/grpo.py --model ./my-model --data prompts.jsonl --method lopt --num_blocks 2 \
        --lambda_aux 10 --lr 1e-6 --local_lr 1e-6 --max_steps 100 --keywords "yes,correct"

The data file holds ``{"prompt": ...}`` rows. The reward is the number of ``--keywords`` in the
completion (replace ``keyword_reward`` with your own verifier).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def keyword_reward(keywords):
    def reward(completions, **kwargs):
        return [float(sum(str(c).split().count(k) for k in keywords)) for c in completions]

    reward.__name__ = "keyword_reward"
    return reward


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--keywords", default="yes", help="comma-separated words the reward counts")
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--max_completion_length", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args(argv)

    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    optimizer = common.prepare(model, args)
    config = trl.GRPOConfig(**common.common_config(args), num_generations=args.num_generations,
                            max_completion_length=args.max_completion_length, temperature=args.temperature)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=keyword_reward(args.keywords.split(",")), args=config,
                              train_dataset=common.load_data(args.data), processing_class=tokenizer,
                              optimizers=(optimizer, None))
    return common.train_and_summarise(trainer, args)


if __name__ == "__main__":
    main()
