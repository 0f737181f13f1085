"""Detection: COCO-format data (and the offline shapes-det generator), `Detector` (a space's
candidate + torchvision FPN + torchvision FCOS head), training, COCO evaluation, and the
deployable ONNX export with decode and NMS inside. See docs/detection.md."""
