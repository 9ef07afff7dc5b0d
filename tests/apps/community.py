# like diffusers' community-pipeline examples: the pipeline class comes from a file next to the app
import argparse
import json
import os

import torch
from diffusers import DiffusionPipeline

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--report", required=True)
args = parser.parse_args()
here = os.path.dirname(os.path.abspath(__file__))
pipe = DiffusionPipeline.from_pretrained(
    args.model,
    custom_pipeline=os.path.join(here, "my_community_pipeline.py"),
    trust_remote_code=True,  # diffusers asks for it for any custom pipeline code, local files too
    dtype=torch.bfloat16,
)
image = pipe("a cat", num_inference_steps=1)[0]
layers = lambda m: sorted({type(x).__name__ for x in m.modules() if "Linear" in type(x).__name__})  # noqa: E731
with open(args.report, "w") as f:
    json.dump(
        {
            "pipeline": type(pipe).__name__,
            "unet": layers(pipe.unet),
            "text_encoder": layers(pipe.text_encoder),
            "image": list(image.shape),
            "finite": bool((image == image).all()),
        },
        f,
    )
