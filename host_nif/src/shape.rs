//! WIT types compiled once, at load, into the form conversions use: every
//! name already an atom, nothing left to look up at call time.
//!
//! Names come from the (untrusted) component, and atoms are never freed, so
//! they are made here and only here, under budgets: a per-component and a
//! node-wide count of *new* atoms, names of at most 255 bytes, and a bound
//! on the total size of the type information (a component can describe an
//! exponentially large type with a handful of definitions). A component over
//! any budget is refused with `ResourceLimit`; calls never create atoms.

use crate::error::{Error, Result};
use rustler::{Atom, Env};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use wasmtime::component::ResourceType;
use wasmtime::component::types::Type;

/// Index into `Names`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NameId(pub u32);

/// The component's names (kebab-case, as in WIT) and their atoms
/// (snake_case).
#[derive(Default)]
pub struct Names {
    wit: Vec<Box<str>>,
    atoms: Vec<Atom>,
    by_atom: HashMap<rustler::sys::ErlNifTerm, NameId>,
    /// Names of the resource types the component exports or imports, for
    /// `Shape::Own` and `Shape::Borrow` (strings: never atoms).
    resources: Vec<Box<str>>,
    /// Which of them the host implements (imported, not WASI).
    host: Vec<bool>,
}

impl Names {
    pub fn atom(&self, id: NameId) -> Atom {
        self.atoms[id.0 as usize]
    }

    pub fn wit(&self, id: NameId) -> &str {
        &self.wit[id.0 as usize]
    }

    /// A resource type's name (`"resource"` when the component does not
    /// name it).
    pub fn resource(&self, id: u32) -> &str {
        self.resources.get(id as usize).map_or("resource", |r| r)
    }

    /// Whether resource type `id` is implemented by the host (in Elixir).
    pub fn is_host(&self, id: u32) -> bool {
        self.host.get(id as usize).copied().unwrap_or(false)
    }

    /// The name an atom stands for, if the component has it.
    pub fn of_atom(&self, atom: Atom) -> Option<NameId> {
        self.by_atom.get(&atom.as_c_arg()).copied()
    }
}

#[derive(Debug)]
pub enum Shape {
    Bool,
    S8,
    U8,
    S16,
    U16,
    S32,
    U32,
    S64,
    U64,
    F32,
    F64,
    Char,
    String,
    /// `list<u8>`: a binary.
    Bytes,
    List(Box<Shape>),
    Record(Box<[(NameId, Shape)]>),
    Tuple(Box<[Shape]>),
    Variant(Box<[(NameId, Option<Shape>)]>),
    Enum(Box<[NameId]>),
    Flags(Box<[NameId]>),
    Option(Box<Shape>),
    Result(Option<Box<Shape>>, Option<Box<Shape>>),
    /// A handle, with the index of its resource type's name in `Names`.
    Own(u32),
    Borrow(u32),
    /// A type Capsid cannot convert (`map`, `future`, `stream`, ...): named
    /// in the error a call gets.
    Unsupported(&'static str),
}

impl Shape {
    /// Whether a value of this type can come out as `nil`, so that an
    /// `option` of it must mark `some` explicitly (`{:some, nil}`).
    pub fn can_be_nil(&self, names: &Names) -> bool {
        match self {
            Shape::Option(_) => true,
            Shape::Enum(cases) => cases.iter().any(|c| names.wit(*c) == "nil"),
            Shape::Variant(cases) => cases
                .iter()
                .any(|(c, payload)| payload.is_none() && names.wit(*c) == "nil"),
            _ => false,
        }
    }

    /// Whether a value of this type can hold a handle of a resource for
    /// which `pick` is true.
    pub fn mentions(&self, pick: &impl Fn(u32) -> bool) -> bool {
        match self {
            Shape::Own(r) | Shape::Borrow(r) => pick(*r),
            Shape::List(s) | Shape::Option(s) => s.mentions(pick),
            Shape::Record(fields) => fields.iter().any(|(_, s)| s.mentions(pick)),
            Shape::Tuple(items) => items.iter().any(|s| s.mentions(pick)),
            Shape::Variant(cases) => cases
                .iter()
                .any(|(_, s)| s.as_ref().is_some_and(|s| s.mentions(pick))),
            Shape::Result(ok, err) => {
                ok.as_ref().is_some_and(|s| s.mentions(pick))
                    || err.as_ref().is_some_and(|s| s.mentions(pick))
            }
            _ => false,
        }
    }

    /// Whether converting a value of this type can take long: it holds a
    /// list or a string, whose size the type does not bound.
    pub fn is_heavy(&self) -> bool {
        match self {
            Shape::String | Shape::Bytes | Shape::List(_) => true,
            Shape::Record(fields) => fields.iter().any(|(_, s)| s.is_heavy()),
            Shape::Tuple(items) => items.iter().any(Shape::is_heavy),
            Shape::Variant(cases) => cases
                .iter()
                .any(|(_, s)| s.as_ref().is_some_and(Shape::is_heavy)),
            Shape::Option(s) => s.is_heavy(),
            Shape::Result(ok, err) => {
                ok.as_ref().is_some_and(|s| s.is_heavy())
                    || err.as_ref().is_some_and(|s| s.is_heavy())
            }
            _ => false,
        }
    }
}

/// Limits on what a component may make the host hold.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// New atoms one component may create.
    pub atoms_per_component: usize,
    /// New atoms all components together may create in this VM.
    pub atoms_total: usize,
    /// Atoms the VM can still create (`atom_limit - atom_count`).
    pub vm_headroom: usize,
    /// Type nodes (functions, fields, cases...) over all exports and imports.
    pub type_nodes: usize,
}

/// Atoms Capsid has created so far, over all components.
static CREATED: AtomicUsize = AtomicUsize::new(0);

pub fn atoms_created() -> usize {
    CREATED.load(Ordering::Relaxed)
}

/// Longest atom the VM accepts, in bytes (its limit is 255 characters).
const MAX_ATOM_BYTES: usize = 255;

/// Compiles types into shapes, collecting names; `finish` makes the atoms.
pub struct Builder {
    budget: Budget,
    nodes: usize,
    ids: HashMap<String, NameId>,
    wit: Vec<Box<str>>,
    resources: Vec<(ResourceType, Box<str>, bool)>,
}

impl Builder {
    pub fn new(budget: Budget) -> Self {
        Builder {
            budget,
            nodes: 0,
            ids: HashMap::new(),
            wit: Vec::new(),
            resources: Vec::new(),
        }
    }

    /// Names a resource type the component exports or imports, so that
    /// handles of it say what they are; `host` when Elixir implements it.
    /// Its id, if it is new (not the same type seen under another name).
    pub fn resource_type(
        &mut self,
        name: &str,
        ty: ResourceType,
        host: bool,
    ) -> Result<Option<u32>> {
        self.node()?;
        if self.resources.iter().any(|(t, _, _)| *t == ty) {
            return Ok(None);
        }
        self.resources.push((ty, name.into(), host));
        Ok(Some((self.resources.len() - 1) as u32))
    }

    fn resource_id(&self, ty: &ResourceType) -> u32 {
        self.resources
            .iter()
            .position(|(t, _, _)| t == ty)
            .map_or(u32::MAX, |i| i as u32)
    }

    /// Whether resource type `id` is implemented by the host.
    pub fn is_host(&self, id: u32) -> bool {
        self.resources.get(id as usize).is_some_and(|r| r.2)
    }

    /// Counts one node of type information against the budget.
    pub fn node(&mut self) -> Result<()> {
        self.nodes += 1;
        if self.nodes > self.budget.type_nodes {
            return Err(Error::ResourceLimit(format!(
                "the component's type information is too large: more than {} type nodes \
                 over its exports and imports (config :capsid, :max_type_nodes)",
                self.budget.type_nodes
            )));
        }
        Ok(())
    }

    fn name(&mut self, wit: &str) -> Result<NameId> {
        if let Some(id) = self.ids.get(wit) {
            return Ok(*id);
        }
        if wit.len() > MAX_ATOM_BYTES {
            return Err(Error::ResourceLimit(format!(
                "the component uses a name of {} bytes ({:?}...); names of records fields, \
                 cases and flags become atoms, which are at most {MAX_ATOM_BYTES} bytes",
                wit.len(),
                wit.chars().take(40).collect::<String>()
            )));
        }
        let id = NameId(self.wit.len() as u32);
        self.wit.push(wit.into());
        self.ids.insert(wit.to_string(), id);
        Ok(id)
    }

    /// Names within one record, variant, enum or flags must stay distinct
    /// after the kebab → snake conversion.
    fn distinct(&self, ids: impl Iterator<Item = NameId>) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for id in ids {
            let snake = kebab_to_snake(&self.wit[id.0 as usize]);
            if !seen.insert(snake.clone()) {
                return Err(Error::InvalidComponent(format!(
                    "two names in one type both become the atom :{snake}"
                )));
            }
        }
        Ok(())
    }

    pub fn shape(&mut self, ty: &Type) -> Result<Shape> {
        self.node()?;
        Ok(match ty {
            Type::Bool => Shape::Bool,
            Type::S8 => Shape::S8,
            Type::U8 => Shape::U8,
            Type::S16 => Shape::S16,
            Type::U16 => Shape::U16,
            Type::S32 => Shape::S32,
            Type::U32 => Shape::U32,
            Type::S64 => Shape::S64,
            Type::U64 => Shape::U64,
            Type::Float32 => Shape::F32,
            Type::Float64 => Shape::F64,
            Type::Char => Shape::Char,
            Type::String => Shape::String,
            Type::List(l) => match l.ty() {
                Type::U8 => Shape::Bytes,
                elem => Shape::List(Box::new(self.shape(&elem)?)),
            },
            Type::Record(r) => {
                let mut fields = Vec::new();
                for f in r.fields() {
                    let id = self.name(f.name)?;
                    fields.push((id, self.shape(&f.ty)?));
                }
                self.distinct(fields.iter().map(|(id, _)| *id))?;
                Shape::Record(fields.into())
            }
            Type::Tuple(t) => {
                let mut items = Vec::new();
                for t in t.types() {
                    items.push(self.shape(&t)?);
                }
                Shape::Tuple(items.into())
            }
            Type::Variant(v) => {
                let mut cases = Vec::new();
                for c in v.cases() {
                    let id = self.name(c.name)?;
                    let payload = match &c.ty {
                        Some(t) => Some(self.shape(t)?),
                        None => None,
                    };
                    cases.push((id, payload));
                }
                self.distinct(cases.iter().map(|(id, _)| *id))?;
                Shape::Variant(cases.into())
            }
            Type::Enum(e) => {
                let mut cases = Vec::new();
                for n in e.names() {
                    self.node()?;
                    cases.push(self.name(n)?);
                }
                self.distinct(cases.iter().copied())?;
                Shape::Enum(cases.into())
            }
            Type::Flags(f) => {
                let mut names = Vec::new();
                for n in f.names() {
                    self.node()?;
                    names.push(self.name(n)?);
                }
                self.distinct(names.iter().copied())?;
                Shape::Flags(names.into())
            }
            Type::Option(o) => Shape::Option(Box::new(self.shape(&o.ty())?)),
            Type::Result(r) => {
                let ok = match r.ok() {
                    Some(t) => Some(Box::new(self.shape(&t)?)),
                    None => None,
                };
                let err = match r.err() {
                    Some(t) => Some(Box::new(self.shape(&t)?)),
                    None => None,
                };
                Shape::Result(ok, err)
            }
            Type::Own(t) => Shape::Own(self.resource_id(t)),
            Type::Borrow(t) => Shape::Borrow(self.resource_id(t)),
            Type::Map(_) => Shape::Unsupported("map"),
            Type::Future(_) => Shape::Unsupported("future"),
            Type::Stream(_) => Shape::Unsupported("stream"),
            Type::ErrorContext => Shape::Unsupported("error-context"),
            Type::FixedLengthList(_) => Shape::Unsupported("fixed-length list"),
        })
    }

    /// Makes the atoms, checking the atom budgets first: nothing is created
    /// when the component is refused.
    pub fn finish(self, env: Env) -> Result<Names> {
        let snake: Vec<String> = self.wit.iter().map(|w| kebab_to_snake(w)).collect();
        let mut new = 0usize;
        for s in &snake {
            if Atom::existing_from_bytes(env, s.as_bytes()).is_err() {
                new += 1;
            }
        }
        let b = self.budget;
        if new > b.atoms_per_component {
            return Err(Error::ResourceLimit(format!(
                "the component would create {new} new atoms (names of record fields, cases and \
                 flags); the limit is {} per component (config :capsid, :max_atoms_per_component)",
                b.atoms_per_component
            )));
        }
        if new > 0 {
            let before = CREATED.fetch_add(new, Ordering::SeqCst);
            if before + new > b.atoms_total || new > b.vm_headroom / 2 {
                CREATED.fetch_sub(new, Ordering::SeqCst);
                return Err(Error::ResourceLimit(format!(
                    "the component would create {new} new atoms; components have created {before} \
                     so far and the limit is {} for all of them (config :capsid, :max_atoms_total), \
                     with the VM's atom table {} atoms from full",
                    b.atoms_total, b.vm_headroom
                )));
            }
        }
        let mut atoms = Vec::with_capacity(snake.len());
        let mut by_atom = HashMap::with_capacity(snake.len());
        for (i, s) in snake.iter().enumerate() {
            let atom = Atom::from_bytes(env, s.as_bytes())
                .map_err(|_| Error::ResourceLimit(format!("the VM refused the atom :{s}")))?;
            by_atom.insert(atom.as_c_arg(), NameId(i as u32));
            atoms.push(atom);
        }
        Ok(Names {
            wit: self.wit,
            atoms,
            by_atom,
            host: self.resources.iter().map(|r| r.2).collect(),
            resources: self.resources.into_iter().map(|(_, n, _)| n).collect(),
        })
    }
}

/// `longest-word` → `longest_word`.
pub fn kebab_to_snake(name: &str) -> String {
    name.replace('-', "_")
}

/// `longest_word` → `longest-word`.
pub fn snake_to_kebab(name: &str) -> String {
    name.replace('_', "-")
}

/// The WIT spelling of a shape, for error messages and signatures.
pub fn wit_name(shape: &Shape, names: &Names) -> String {
    // Long enums get their first cases and a count, so that an error
    // message stays readable (and small) whatever the component declares.
    let list = |ids: &mut dyn Iterator<Item = NameId>| {
        let all: Vec<NameId> = ids.collect();
        let mut out = all
            .iter()
            .take(10)
            .map(|id| format!(":{}", kebab_to_snake(names.wit(*id))))
            .collect::<Vec<_>>()
            .join(", ");
        if all.len() > 10 {
            out.push_str(&format!(" and {} more", all.len() - 10));
        }
        out
    };
    match shape {
        Shape::Bool => "bool".into(),
        Shape::S8 => "s8".into(),
        Shape::U8 => "u8".into(),
        Shape::S16 => "s16".into(),
        Shape::U16 => "u16".into(),
        Shape::S32 => "s32".into(),
        Shape::U32 => "u32".into(),
        Shape::S64 => "s64".into(),
        Shape::U64 => "u64".into(),
        Shape::F32 => "f32".into(),
        Shape::F64 => "f64".into(),
        Shape::Char => "char".into(),
        Shape::String => "string".into(),
        Shape::Bytes => "list<u8>".into(),
        Shape::List(e) => format!("list<{}>", wit_name(e, names)),
        Shape::Tuple(items) => format!(
            "tuple<{}>",
            items
                .iter()
                .map(|s| wit_name(s, names))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Shape::Record(fields) => {
            format!(
                "record with keys {}",
                list(&mut fields.iter().map(|(id, _)| *id))
            )
        }
        Shape::Variant(cases) => {
            format!("variant of {}", list(&mut cases.iter().map(|(id, _)| *id)))
        }
        Shape::Enum(cases) => format!("enum of {}", list(&mut cases.iter().copied())),
        Shape::Flags(flags) => format!("flags of {}", list(&mut flags.iter().copied())),
        Shape::Option(s) => format!("option<{}>", wit_name(s, names)),
        Shape::Result(ok, err) => {
            let side =
                |s: &Option<Box<Shape>>| s.as_ref().map_or("_".into(), |s| wit_name(s, names));
            format!("result<{}, {}>", side(ok), side(err))
        }
        Shape::Own(r) => format!("own<{}>", names.resource(*r)),
        Shape::Borrow(r) => format!("borrow<{}>", names.resource(*r)),
        Shape::Unsupported(what) => (*what).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_convert_both_ways() {
        assert_eq!(kebab_to_snake("longest-word"), "longest_word");
        assert_eq!(snake_to_kebab("longest_word"), "longest-word");
        assert_eq!(snake_to_kebab(&kebab_to_snake("a-b-c1")), "a-b-c1");
    }

    fn budget(nodes: usize) -> Budget {
        Budget {
            atoms_per_component: 10,
            atoms_total: 100,
            vm_headroom: 1_000_000,
            type_nodes: nodes,
        }
    }

    #[test]
    fn the_node_budget_stops_huge_types() {
        let mut b = Builder::new(budget(3));
        assert!(b.shape(&Type::U8).is_ok());
        assert!(b.shape(&Type::U8).is_ok());
        assert!(b.shape(&Type::U8).is_ok());
        let err = b.shape(&Type::U8).unwrap_err().to_string();
        assert!(err.contains("max_type_nodes"), "{err}");
    }

    #[test]
    fn names_longer_than_an_atom_are_refused() {
        let mut b = Builder::new(budget(10));
        let long = "a".repeat(256);
        let err = b.name(&long).unwrap_err().to_string();
        assert!(err.contains("at most 255 bytes"), "{err}");
        assert!(b.name(&"a".repeat(255)).is_ok());
    }
}
