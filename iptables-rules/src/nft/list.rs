//! Reading nf_tables state back (tables, chains, rules, set elements) through dumps.

use super::attr::{Attr, Attrs};
use super::batch::{elem_comment_from_udata, BaseChain, ChainType, Hook, SetElem};
use super::consts::*;
use super::expr::Expr;
use super::socket::{NftError, NftSocket};

/// A chain as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainInfo {
    /// Table name.
    pub table: String,
    /// Chain name.
    pub name: String,
    /// Hook/type/priority for base chains.
    pub base: Option<BaseChain>,
}

/// A rule as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    /// Table name.
    pub table: String,
    /// Chain name.
    pub chain: String,
    /// Kernel handle.
    pub handle: u64,
    /// Its expressions.
    pub exprs: Vec<Expr>,
}

impl NftSocket {
    /// Names of the tables of one family.
    pub fn list_tables(&mut self, family: u8) -> Result<Vec<String>, NftError> {
        let msgs = self.dump(NFT_MSG_GETTABLE, family, &[], "list tables")?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                Attrs(m)
                    .find(|a| a.ty == NFTA_TABLE_NAME)
                    .and_then(|a| a.str())
                    .map(str::to_owned)
            })
            .collect())
    }

    /// Chains of one table, in the kernel's order (creation order).
    pub fn list_chains(&mut self, family: u8, table: &str) -> Result<Vec<ChainInfo>, NftError> {
        let what = format!("list chains of table {} {table}", super::batch::fam(family));
        let msgs = self.dump(
            NFT_MSG_GETCHAIN,
            family,
            &[(NFTA_CHAIN_TABLE, table)],
            &what,
        )?;
        let mut out = Vec::new();
        for m in &msgs {
            let c = parse_chain(m).ok_or_else(|| NftError::Protocol { what: what.clone() })?;
            if c.table == table {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Rules of one table, chain by chain in the kernel's order.
    pub fn list_rules(&mut self, family: u8, table: &str) -> Result<Vec<RuleInfo>, NftError> {
        let what = format!("list rules of table {} {table}", super::batch::fam(family));
        let msgs = self.dump(NFT_MSG_GETRULE, family, &[(NFTA_RULE_TABLE, table)], &what)?;
        let mut out = Vec::new();
        for m in &msgs {
            let r = parse_rule(m).ok_or_else(|| NftError::Protocol { what: what.clone() })?;
            if r.table == table {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Chains of every table of one family, in one dump (the kernel's order).
    pub fn list_family_chains(&mut self, family: u8) -> Result<Vec<ChainInfo>, NftError> {
        let what = format!("list chains of family {}", super::batch::fam(family));
        let msgs = self.dump(NFT_MSG_GETCHAIN, family, &[], &what)?;
        msgs.iter()
            .map(|m| parse_chain(m).ok_or_else(|| NftError::Protocol { what: what.clone() }))
            .collect()
    }

    /// Rules of every table of one family, in one dump (chain by chain, the kernel's order).
    pub fn list_family_rules(&mut self, family: u8) -> Result<Vec<RuleInfo>, NftError> {
        let what = format!("list rules of family {}", super::batch::fam(family));
        let msgs = self.dump(NFT_MSG_GETRULE, family, &[], &what)?;
        msgs.iter()
            .map(|m| parse_rule(m).ok_or_else(|| NftError::Protocol { what: what.clone() }))
            .collect()
    }

    /// The named tables of one family as the kernel holds them, from two dumps (chains, then
    /// rules) for the whole family; a table without chains (it hooks nothing) is left out.
    pub fn read_family_tables<'a>(
        &mut self,
        family: u8,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<super::lower::NftTable>, NftError> {
        use super::lower::{NftChain, NftTable};
        let chains = self.list_family_chains(family)?;
        let rules = self.list_family_rules(family)?;
        let mut out = Vec::new();
        for name in names {
            let mut table: Vec<NftChain> = chains
                .iter()
                .filter(|c| c.table == name)
                .map(|c| NftChain {
                    name: c.name.clone(),
                    base: c.base,
                    rules: Vec::new(),
                })
                .collect();
            if table.is_empty() {
                continue;
            }
            for r in rules.iter().filter(|r| r.table == name) {
                if let Some(c) = table.iter_mut().find(|c| c.name == r.chain) {
                    c.rules.push(r.exprs.clone());
                }
            }
            out.push(NftTable {
                name: name.to_owned(),
                chains: table,
            });
        }
        Ok(out)
    }

    /// Elements of one set (key bytes and comment).
    pub fn list_elements(
        &mut self,
        family: u8,
        table: &str,
        set: &str,
    ) -> Result<Vec<SetElem>, NftError> {
        let what = format!(
            "list elements of set {} {table} {set}",
            super::batch::fam(family)
        );
        let msgs = self.dump(
            NFT_MSG_GETSETELEM,
            family,
            &[
                (NFTA_SET_ELEM_LIST_TABLE, table),
                (NFTA_SET_ELEM_LIST_SET, set),
            ],
            &what,
        )?;
        let mut out = Vec::new();
        for m in &msgs {
            out.extend(parse_elements(m, &what)?);
        }
        Ok(out)
    }

    /// One element of a set by key (a GET of that key, not a dump of the set); `None` if absent.
    pub fn get_element(
        &mut self,
        family: u8,
        table: &str,
        set: &str,
        key: &[u8],
    ) -> Result<Option<SetElem>, NftError> {
        let what = format!(
            "get element of set {} {table} {set}",
            super::batch::fam(family)
        );
        let reply = self.get(
            NFT_MSG_GETSETELEM,
            family,
            |w| {
                w.attr_str(NFTA_SET_ELEM_LIST_TABLE, table);
                w.attr_str(NFTA_SET_ELEM_LIST_SET, set);
                let list = w.begin_nest(NFTA_SET_ELEM_LIST_ELEMENTS);
                let el = w.begin_nest(NFTA_LIST_ELEM);
                let k = w.begin_nest(NFTA_SET_ELEM_KEY);
                w.attr(NFTA_DATA_VALUE, key);
                w.end_nest(k);
                w.end_nest(el);
                w.end_nest(list);
            },
            &what,
        );
        let msgs = match reply {
            Ok(m) => m,
            Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut found = Vec::new();
        for m in &msgs {
            found.extend(parse_elements(m, &what)?);
        }
        Ok(found.into_iter().find(|e| e.key == key))
    }
}

/// The elements in one `NEWSETELEM` message (key bytes and comment).
fn parse_elements(m: &[u8], what: &str) -> Result<Vec<SetElem>, NftError> {
    let mut out = Vec::new();
    for list in Attrs(m).filter(|a| a.ty == NFTA_SET_ELEM_LIST_ELEMENTS) {
        for el in list.nested().filter(|a| a.ty == NFTA_LIST_ELEM) {
            let mut key = None;
            let mut comment = None;
            for a in el.nested() {
                match a.ty {
                    NFTA_SET_ELEM_KEY => {
                        key = a
                            .nested()
                            .find(|x| x.ty == NFTA_DATA_VALUE)
                            .map(|x| x.payload.to_vec())
                    }
                    NFTA_SET_ELEM_USERDATA => comment = elem_comment_from_udata(a.payload),
                    _ => {}
                }
            }
            let key = key.ok_or_else(|| NftError::Protocol { what: what.into() })?;
            out.push(SetElem { key, comment });
        }
    }
    Ok(out)
}

fn str_attr(attrs: &[Attr<'_>], ty: u16) -> Option<String> {
    attrs
        .iter()
        .find(|a| a.ty == ty)
        .and_then(|a| a.str())
        .map(str::to_owned)
}

fn parse_chain(m: &[u8]) -> Option<ChainInfo> {
    let attrs: Vec<_> = Attrs(m).collect();
    let base = match attrs.iter().find(|a| a.ty == NFTA_CHAIN_HOOK) {
        Some(h) => {
            let mut hooknum = None;
            let mut prio = None;
            for a in h.nested() {
                match a.ty {
                    NFTA_HOOK_HOOKNUM => hooknum = a.be32(),
                    NFTA_HOOK_PRIORITY => prio = a.be32().map(|p| p as i32),
                    _ => {}
                }
            }
            let ty = match str_attr(&attrs, NFTA_CHAIN_TYPE)?.as_str() {
                "nat" => ChainType::Nat,
                "route" => ChainType::Route,
                _ => ChainType::Filter,
            };
            let hook = match hooknum? {
                NF_INET_PRE_ROUTING => Hook::Prerouting,
                NF_INET_LOCAL_IN => Hook::Input,
                NF_INET_FORWARD => Hook::Forward,
                NF_INET_LOCAL_OUT => Hook::Output,
                _ => Hook::Postrouting,
            };
            Some(BaseChain {
                ty,
                hook,
                priority: prio?,
            })
        }
        None => None,
    };
    Some(ChainInfo {
        table: str_attr(&attrs, NFTA_CHAIN_TABLE)?,
        name: str_attr(&attrs, NFTA_CHAIN_NAME)?,
        base,
    })
}

fn parse_rule(m: &[u8]) -> Option<RuleInfo> {
    let attrs: Vec<_> = Attrs(m).collect();
    let handle = attrs
        .iter()
        .find(|a| a.ty == NFTA_RULE_HANDLE)
        .and_then(|a| Some(u64::from_be_bytes(a.payload.get(..8)?.try_into().ok()?)))?;
    let mut exprs = Vec::new();
    if let Some(list) = attrs.iter().find(|a| a.ty == NFTA_RULE_EXPRESSIONS) {
        for e in list.nested().filter(|a| a.ty == NFTA_LIST_ELEM) {
            exprs.push(Expr::decode(&e)?);
        }
    }
    Some(RuleInfo {
        table: str_attr(&attrs, NFTA_RULE_TABLE)?,
        chain: str_attr(&attrs, NFTA_RULE_CHAIN)?,
        handle,
        exprs,
    })
}
