//! `acme:toolkit/pricing`: a small pricing engine.
//!
//! All amounts are integer cents. The rules:
//!
//! * `subtotal` is Σ quantity × unit price (checked: overflow is an error).
//! * The discount applies to `DISCOUNTABLE` items only:
//!   `percent(p)` takes ⌊discountable × p / 100⌋, `fixed-cents(f)` takes
//!   min(f, discountable), and `buy-x-get-y(x, y)` makes
//!   ⌊quantity / (x + y)⌋ × y units of *each* discountable line free.
//! * Tax is charged on the `TAXABLE` lines after their share of the discount:
//!   `buy-x-get-y` knows each line's discount exactly; `percent` and
//!   `fixed-cents` are spread over the discountable lines in proportion to
//!   their amounts (rounded down, i.e. in the customer's favour never more
//!   than one cent). The rate depends on the currency (EUR and GBP 20 %,
//!   USD 8 %) and the tax is rounded half up to the cent.
//! * `total = subtotal - discount + tax`.

use crate::Toolkit;
use crate::bindings::exports::acme::toolkit::pricing::{
    BasketQuote, Currency, Discount, Guest, ItemTags, LineItem,
};

impl Guest for Toolkit {
    fn quote(
        items: Vec<LineItem>,
        discount: Discount,
        currency: Currency,
    ) -> Result<BasketQuote, String> {
        quote(&items, discount, currency)
    }

    fn divide(a: i64, b: i64) -> Result<i64, String> {
        if b == 0 {
            return Err("division by zero".to_owned());
        }
        a.checked_div(b).ok_or_else(|| "overflow".to_owned())
    }

    fn describe() -> String {
        "pricing: quotes with discounts and tax".to_owned()
    }
}

/// Running sums over the basket, in cents.
#[derive(Default)]
struct Sums {
    subtotal: u64,
    discountable: u64,
    taxable: u64,
    /// Lines that are both taxable and discountable.
    taxable_discountable: u64,
}

/// A discount and the part of it that reduces the taxable amount.
struct AppliedDiscount {
    total: u64,
    on_taxable: u64,
}

fn quote(
    items: &[LineItem],
    discount: Discount,
    currency: Currency,
) -> Result<BasketQuote, String> {
    if items.is_empty() {
        return Err("empty basket".to_owned());
    }
    validate_discount(discount)?;

    let mut sums = Sums::default();
    for item in items {
        if item.quantity == 0 {
            return Err(format!("item {}: quantity must be positive", item.sku));
        }
        let amount = line_amount(item)?;
        sums.subtotal = add(sums.subtotal, amount)?;
        let discountable = item.tags.contains(ItemTags::DISCOUNTABLE);
        let taxable = item.tags.contains(ItemTags::TAXABLE);
        if discountable {
            sums.discountable = add(sums.discountable, amount)?;
        }
        if taxable {
            sums.taxable = add(sums.taxable, amount)?;
        }
        if discountable && taxable {
            sums.taxable_discountable = add(sums.taxable_discountable, amount)?;
        }
    }

    let mut warnings = Vec::new();
    let any_tagged = |tag| items.iter().any(|item| item.tags.contains(tag));
    if !matches!(discount, Discount::None) && !any_tagged(ItemTags::DISCOUNTABLE) {
        warnings.push("discount ignored: no discountable items".to_owned());
    }
    if any_tagged(ItemTags::FRAGILE) {
        warnings.push("fragile items ship separately".to_owned());
    }
    if any_tagged(ItemTags::DIGITAL) {
        warnings.push("digital items are not shipped".to_owned());
    }

    let applied = apply_discount(items, discount, &sums)?;
    let taxable_after_discount = sums.taxable.saturating_sub(applied.on_taxable);
    let tax = percent_half_up(taxable_after_discount, tax_rate_percent(currency))?;
    // The discount never exceeds the discountable part of the subtotal.
    let total = add(sums.subtotal - applied.total, tax)?;

    Ok(BasketQuote {
        subtotal_cents: sums.subtotal,
        discount_cents: applied.total,
        tax_cents: tax,
        total_cents: total,
        currency,
        warnings,
    })
}

fn validate_discount(discount: Discount) -> Result<(), String> {
    match discount {
        Discount::Percent(p) if p > 100 => Err("percent discount must be at most 100".to_owned()),
        Discount::BuyXGetY((x, y)) if x == 0 && y == 0 => {
            Err("buy-x-get-y needs x + y > 0".to_owned())
        }
        _ => Ok(()),
    }
}

fn apply_discount(
    items: &[LineItem],
    discount: Discount,
    sums: &Sums,
) -> Result<AppliedDiscount, String> {
    let proportional = |total: u64| AppliedDiscount {
        total,
        on_taxable: share(total, sums.taxable_discountable, sums.discountable),
    };

    Ok(match discount {
        Discount::None => AppliedDiscount {
            total: 0,
            on_taxable: 0,
        },
        Discount::Percent(p) => proportional(share(sums.discountable, u64::from(p), 100)),
        Discount::FixedCents(cents) => proportional(cents.min(sums.discountable)),
        Discount::BuyXGetY((x, y)) => {
            let bundle = u64::from(x) + u64::from(y);
            let mut applied = AppliedDiscount {
                total: 0,
                on_taxable: 0,
            };
            for item in items
                .iter()
                .filter(|item| item.tags.contains(ItemTags::DISCOUNTABLE))
            {
                let free_units = u64::from(item.quantity) / bundle * u64::from(y);
                // free_units <= quantity, so this is at most the line amount.
                let cents = free_units * item.unit_price_cents;
                applied.total = add(applied.total, cents)?;
                if item.tags.contains(ItemTags::TAXABLE) {
                    applied.on_taxable = add(applied.on_taxable, cents)?;
                }
            }
            applied
        }
    })
}

fn line_amount(item: &LineItem) -> Result<u64, String> {
    u64::from(item.quantity)
        .checked_mul(item.unit_price_cents)
        .ok_or_else(overflow)
}

fn tax_rate_percent(currency: Currency) -> u64 {
    match currency {
        Currency::Eur | Currency::Gbp => 20,
        Currency::Usd => 8,
    }
}

/// ⌊amount × numerator / denominator⌋ for `numerator <= denominator`, so the
/// result always fits back into a `u64`; 0 when `denominator` is 0.
fn share(amount: u64, numerator: u64, denominator: u64) -> u64 {
    if denominator == 0 {
        return 0;
    }
    let exact = u128::from(amount) * u128::from(numerator) / u128::from(denominator);
    u64::try_from(exact).unwrap_or(u64::MAX)
}

/// `amount × percent / 100`, rounded half up.
fn percent_half_up(amount: u64, percent: u64) -> Result<u64, String> {
    let rounded = (u128::from(amount) * u128::from(percent) + 50) / 100;
    u64::try_from(rounded).map_err(|_| overflow())
}

fn add(a: u64, b: u64) -> Result<u64, String> {
    a.checked_add(b).ok_or_else(overflow)
}

fn overflow() -> String {
    "amount overflow".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(sku: &str, quantity: u32, unit_price_cents: u64, tags: ItemTags) -> LineItem {
        LineItem {
            sku: sku.to_owned(),
            quantity,
            unit_price_cents,
            tags,
        }
    }

    #[test]
    fn percent_discount_and_tax() {
        let all = ItemTags::TAXABLE | ItemTags::DISCOUNTABLE;
        let items = [
            item("a", 2, 1000, all),
            item("b", 1, 500, ItemTags::TAXABLE),
        ];
        let q = quote(&items, Discount::Percent(10), Currency::Eur).unwrap();
        assert_eq!((q.subtotal_cents, q.discount_cents), (2500, 200));
        assert_eq!(q.tax_cents, 460); // 20 % of 2300
        assert_eq!(q.total_cents, 2760);
    }

    #[test]
    fn buy_two_get_one() {
        let items = [item("a", 7, 100, ItemTags::DISCOUNTABLE)];
        let q = quote(&items, Discount::BuyXGetY((2, 1)), Currency::Usd).unwrap();
        assert_eq!(
            (q.discount_cents, q.tax_cents, q.total_cents),
            (200, 0, 500)
        );
    }

    #[test]
    fn errors_and_warnings() {
        assert_eq!(
            quote(&[], Discount::None, Currency::Gbp).unwrap_err(),
            "empty basket"
        );
        let fragile = [item("v", 1, 999, ItemTags::FRAGILE)];
        let q = quote(&fragile, Discount::FixedCents(5), Currency::Gbp).unwrap();
        assert_eq!(q.warnings.len(), 2);
        let huge = [item("x", 2, u64::MAX, ItemTags::empty())];
        assert_eq!(
            quote(&huge, Discount::None, Currency::Eur).unwrap_err(),
            "amount overflow"
        );
    }
}
