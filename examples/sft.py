"""Supervised fine-tuning with TRL's SFTTrainer, end-to-end or with LoPT, fully offline.

    python examples/sft.py --model ./my-model --data train.jsonl --method lopt --num_blocks 2 \
        --lambda_aux 10 --lr 1e-5 --local_lr 1e-5 --max_steps 200

The data file holds ``{"prompt": ..., "completion": ...}`` rows (loss on the completion only) or
``{"text": ...}`` rows (or chat ``messages``), as TRL's SFTTrainer reads them.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--max_length", type=int, default=1024)
    args = parser.parse_args(argv)

    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    optimizer = common.prepare(model, args)
    config = trl.SFTConfig(**common.common_config(args), max_length=args.max_length)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=common.load_data(args.data),
                             processing_class=tokenizer, optimizers=(optimizer, None))
    return common.train_and_summarise(trainer, args)


if __name__ == "__main__":
    main()
