"""Integer codes shared by every backend of the steering ops (reference,
C++, CUDA, Triton). The C++ side mirrors these in ``csrc/steer_codes.h``;
``python_tests/test_ops.py`` checks that the two agree."""

# Per (strengths row, feature column) intervention modes. Code 0 is "off":
# row 0 of every table is all-off, which makes it an exact no-op row for
# padding and unsteered requests.
MODE_OFF = 0
MODE_ADD = 1  # f' = f + s          (no encode needed)
MODE_SET = 2  # f' = s * max_act    (clamp-to-value; clamp_direction uses it too)
MODE_SCALE = 3  # f' = f * s
MODE_ABLATE = 4  # f' = 0

MODE_CODES = {
    "off": MODE_OFF,
    "add": MODE_ADD,
    "set": MODE_SET,
    "clamp": MODE_SET,
    "scale": MODE_SCALE,
    "ablate": MODE_ABLATE,
}

# How the selected features' activations are computed from pre-activations.
ACT_THRESHOLD_RELU = 0  # f = pre if pre > thr else 0 (standard: thr = 0; JumpReLU)
ACT_IDENTITY = 1  # f = pre (clamp_direction: projection onto unit directions)
ACT_TOPK = 2  # f = relu(pre) if pre >= kth[t] else 0 (exact TopK; kth from a full encode)

ACT_NAMES = {ACT_THRESHOLD_RELU: "threshold_relu", ACT_IDENTITY: "identity", ACT_TOPK: "topk"}
