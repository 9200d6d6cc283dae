"""Gradio side-by-side demo of dq: FP vs quantized images with latency, memory, size, PSNR and LPIPS.

    python app.py                     # reference pipelines, http://127.0.0.1:7860
    python app.py --model DIR --port 7861

Same flags as `dq app`; the app itself lives in dq/app/.
"""

import sys

from dq.commands.app import main

if __name__ == "__main__":
    sys.exit(main())
