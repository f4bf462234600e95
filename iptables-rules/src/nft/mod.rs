//! A small nf_tables netlink client of our own: builds transactions (tables, chains, rules with
//! the expressions the ambient rules need, sets and elements), sends them atomically with
//! per-object ACKs, and reads state back. No `nft` process, no libnftnl.

mod attr;
mod batch;
pub mod consts;
mod expr;
pub mod host;
mod list;
pub mod lower;
mod socket;

pub use batch::{BaseChain, Batch, ChainType, Hook, SetElem, SetKey};
pub use expr::{CmpOp, CtKey, Expr, MetaKey, NatKind, PayloadBase, Reg, Verdict};
pub use host::{NftHostProbe, ProbeEntry};
pub use list::{ChainInfo, RuleInfo};
pub use socket::{NftError, NftSocket};
