"""Engine backend that serves through SGLang (optional extra `aurora[sglang]`; needs CUDA).

Two processes, one data path:
  Aurora (HTTP routes, trainer)  --/generate over loopback-->  SGLang server (target + EAGLE3 draft, TP ranks)
  SGLang scheduler, TP rank 0   --capture frames, unix socket-->  Aurora: CaptureCollector -> Sample -> trainer
  trainer -> SGLangEngine.swap_draft -> pause(in_place) + update_weights_from_tensor(draft-only loader) + continue

  launch.py   builds SGLang's command line from ServeConfig and manages the server process
  engine.py   SGLangEngine: the AsyncEngine interface (generate/abort/swap_draft/stats) over SGLang's HTTP API
  capture.py  Aurora side of capture: frames -> per-request rows -> Sample at request finish
  wire.py     the frame format shared by both sides (no torch/SGLang imports beyond torch)
  plugin/     imported *inside* SGLang's scheduler processes (SGLANG_EXTERNAL_MODEL_PACKAGE): the capture
              hooks, the step swap, the depth decision (aurora.engine.speculation's, over SGLang's adaptive
              states) and the draft-only in-place weight loader. Nothing else in Aurora runs there.
"""
