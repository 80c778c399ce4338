"""Writes a trained run (or a field checkpoint) in the field's formats (`dgia_jax.inference.formats`):

  python -m dgia_jax.tools.export_model --workdir runs/cuhk_pedes --best --format irra --out best.pth [--fp32]
  python -m dgia_jax.tools.export_model --workdir runs/clip_synth --format hf --out clip_synth_hf/

`irra` is what IRRA's and DGCMIA's code loads (`Checkpointer.load`): their test.py evaluates it as
one of theirs; `hf` is a Hugging Face CLIP folder (`transformers.CLIPModel.from_pretrained`), for
square inputs.
"""

from absl import flags
from ml_collections import config_flags

from dgia_jax import cli
from dgia_jax.inference import formats, rebuild

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Instead of --workdir: a field checkpoint (e.g. to convert it "
                                  "to hf).")
_CONFIG = config_flags.DEFINE_config_file("config", cli.FIELD_CHECKPOINT_CONFIG, "With --checkpoint: the config "
                                          "describing its model, input and tokenizer (data.tokenizer: CLIP's BPE).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", lower_bound=0)
_BEST = flags.DEFINE_bool("best", False, "The best-on-validation parameters the run kept (workdir/best).")
_FORMAT = flags.DEFINE_enum("format", None, formats.FORMATS, "irra: the field's best.pth; hf: a Hugging Face CLIP folder.")
_OUT = flags.DEFINE_string("out", None, "The .pth file (irra) or the folder (hf) to write.")
_FP32 = flags.DEFINE_bool("fp32", False, "irra: every tensor float32 (default: float16 where the field's code has it).")
flags.mark_flags_as_required(["format", "out"])


def main(argv):
  cli.start(argv)
  model = cli.model_of_flags(_WORKDIR.value, _CHECKPOINT.value, _CONFIG.value)
  run = rebuild.load_model(model, _STEP.value, _BEST.value)
  if _FORMAT.value == "irra":
    written = formats.write_irra(run, _OUT.value, fp16=not _FP32.value)
    print(f"wrote {_OUT.value}: {written['keys']} tensors under base_model. ({written['fp16_tensors']} float16), "
          f"step {run.step}; load it with the field's Checkpointer")
  else:
    written = formats.write_hf(run, _OUT.value, run.config.loss.temperature)
    print(f"wrote {_OUT.value}: config.json, model.safetensors ({written['tensors']} tensors), tokenizer.json; "
          f"step {run.step}; transformers.CLIPModel.from_pretrained({_OUT.value!r})")


if __name__ == "__main__":
  cli.run(main)
