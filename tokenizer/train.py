"""Train a byte-level BPE tokenizer with ChatML special tokens and chat template.

    python tokenizer/train.py --train_files corpus.jsonl --vocab_size 32000 --output_dir tok/

The same as `trainrig tokenizer ...`; the code is trainers/tokenizer.py.
"""

import sys

from trainers.tokenizer import main

if __name__ == "__main__":
    main(sys.argv[1:])
