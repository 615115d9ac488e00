//! Guest resources for Capsid's tests (world `capsid:res/res`): a `cart`
//! resource whose live objects are counted, so that a test sees when the
//! host dropped one.

use std::cell::{Cell, RefCell};

#[allow(unsafe_code)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/res",
        world: "capsid:res/res",
    });
}

use bindings::exports::capsid::res::shop::{self, Cart, CartBorrow, Labelled};

thread_local! {
    static LIVE: Cell<u32> = const { Cell::new(0) };
}

struct MyCart {
    owner: String,
    items: RefCell<Vec<(String, u32)>>,
}

impl MyCart {
    fn make(owner: String, items: Vec<(String, u32)>) -> MyCart {
        LIVE.with(|l| l.set(l.get() + 1));
        MyCart {
            owner,
            items: RefCell::new(items),
        }
    }

    fn total(&self) -> u32 {
        self.items.borrow().iter().map(|(_, q)| q).sum()
    }
}

impl Drop for MyCart {
    fn drop(&mut self) {
        LIVE.with(|l| l.set(l.get() - 1));
    }
}

impl shop::GuestCart for MyCart {
    fn new(owner: String) -> MyCart {
        MyCart::make(owner, Vec::new())
    }

    fn add(&self, item: String, qty: u32) {
        self.items.borrow_mut().push((item, qty));
    }

    fn count(&self) -> u32 {
        self.total()
    }

    fn owner(&self) -> String {
        self.owner.clone()
    }

    fn fail(&self) {
        panic!("cart {} failed on purpose", self.owner);
    }

    fn merge(a: CartBorrow<'_>, b: CartBorrow<'_>) -> Cart {
        let (a, b) = (a.get::<MyCart>(), b.get::<MyCart>());
        let mut items = a.items.borrow().clone();
        items.extend(b.items.borrow().iter().cloned());
        Cart::new(MyCart::make(format!("{}+{}", a.owner, b.owner), items))
    }
}

struct Component;

impl shop::Guest for Component {
    type Cart = MyCart;

    fn live() -> u32 {
        LIVE.with(Cell::get)
    }

    fn consume(c: Cart) -> u32 {
        c.get::<MyCart>().total()
    }

    fn make_many(owner: String, n: u32) -> Vec<Cart> {
        (0..n)
            .map(|_| Cart::new(MyCart::make(owner.clone(), Vec::new())))
            .collect()
    }

    fn total(carts: Vec<CartBorrow<'_>>) -> u32 {
        carts.iter().map(|c| c.get::<MyCart>().total()).sum()
    }

    fn maybe(owner: Option<String>) -> Option<Cart> {
        owner.map(|o| Cart::new(MyCart::make(o, Vec::new())))
    }

    fn label(c: Cart, label: String) -> Labelled {
        Labelled { label, cart: c }
    }

    fn unlabel(l: Labelled) -> u32 {
        l.cart.get::<MyCart>().total()
    }
}

// The `export!` macro expands to `#[unsafe(export_name = ...)]` entry points.
#[allow(unsafe_code)]
mod export {
    use super::{Component, bindings};
    bindings::export!(Component with_types_in bindings);
}
