// placeholder (being written)
#include <torch/library.h>
