//! Finding pods' network namespaces without a CNI event (the /proc scan).

pub mod cgroup;
pub mod procfs;
pub mod scan;

pub use scan::scan_for_pods;
