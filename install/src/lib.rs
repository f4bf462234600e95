//! The installer: plugin binary copy and CNI conflist chaining with repair.
