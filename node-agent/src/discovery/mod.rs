//! Finding pods' network namespaces without a CNI event (the /proc scan).
