"""The numpy side: everything after export reads the bundle from here, without torch.

- `manifest`, `names`, `fsutil`: the bundle (sdrt.json, graph and tensor names, hashed files);
- `tokenizer`, `prompt`, `text`, `embeddings`, `lora`: a prompt in A1111's syntax to the text encoder's output;
- `samplers/`: the schedulers, pure numpy; `pipeline`, `modes`, `request`, `images`, `depth`, `watermark`: the
  denoise loop and the image modes around it; `controlnet`, `controls`, `preprocess`: ControlNet bundles and
  a request's controls;
- `families/`: what sets a model family apart (the U-Net's conditioning inputs and their shapes);
- `engines/`: the backends that run the graphs (ONNX Runtime, TensorRT), behind one Engine interface.

Imports point inward: the pipeline imports `engines` (through `open_engines`) and `families`; neither imports
the pipeline. Nothing here imports sdrt.export, torch, diffusers, transformers or onnx.
"""
