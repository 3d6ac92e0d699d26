// Buffers of CPU inference passes kept for the next pass (see activation_pool.cpp).
#pragma once

#include <torch/extension.h>

namespace resnet_fast {

// Adds the ActivationPool and ActivationPoolScope classes to the extension's Python module.
void bind_activation_pool(pybind11::module& module);

}  // namespace resnet_fast
