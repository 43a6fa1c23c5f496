//! Local control plane: see the helper task.
