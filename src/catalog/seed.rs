//! The catalog's starting books: the original's seven, or a catalog file.

use std::path::Path;

use serde::Deserialize;

use crate::api::{Book, BookId, Money, TopicSlug};

/// The seven books of the original store (stock 1000 each, costs as in its sync log).
pub fn default_books() -> Vec<Book> {
    const DS: &str = "distributed systems";
    const GS: &str = "graduate school";
    let books: [(u64, &str, &str, u64); 7] = [
        (
            1,
            "How to get a good grade in 677 in 20 minutes a day.",
            DS,
            1000,
        ),
        (2, "RPCs for Dummies.", DS, 1),
        (3, "Xen and the Art of Surviving Graduate School.", GS, 100),
        (4, "Cooking for the Impatient Graduate Student.", GS, 1000),
        (5, "How to finish Project 3 on time.", DS, 1000),
        (6, "Why theory classes are so hard.", DS, 1),
        (7, "Spring in Pioneer Valley.", GS, 10000),
    ];
    books
        .iter()
        .map(|&(id, title, topic, cost)| Book {
            id: BookId::new(id).expect("seed ids are valid"),
            title: title.to_string(),
            topic: topic.to_string(),
            cost: Money::from_cents(cost * 100).expect("seed costs are valid"),
            stock: 1000,
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBook {
    id: BookId,
    title: String,
    topic: String,
    cost: Money,
    stock: u64,
}

/// Reads a catalog file: a JSON list of `{"id", "title", "topic", "cost", "stock"}`.
pub fn load_books(path: &Path) -> Result<Vec<Book>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read catalog file {}: {e}", path.display()))?;
    let raw: Vec<FileBook> = serde_json::from_str(&text)
        .map_err(|e| format!("catalog file {} is not valid: {e}", path.display()))?;
    let mut seen = std::collections::HashSet::new();
    let mut books = Vec::with_capacity(raw.len());
    for b in raw {
        if !seen.insert(b.id) {
            return Err(format!(
                "catalog file {}: book id {} appears twice",
                path.display(),
                b.id
            ));
        }
        if b.title.trim().is_empty() || b.title.len() > 1000 {
            return Err(format!(
                "catalog file {}: book {} needs a title of 1..1000 bytes",
                path.display(),
                b.id
            ));
        }
        TopicSlug::of_name(&b.topic)
            .map_err(|e| format!("catalog file {}: book {}: {e}", path.display(), b.id))?;
        if b.stock > crate::api::MAX_STOCK {
            return Err(format!(
                "catalog file {}: book {}: stock too large",
                path.display(),
                b.id
            ));
        }
        books.push(Book {
            id: b.id,
            title: b.title,
            topic: b.topic,
            cost: b.cost,
            stock: b.stock,
        });
    }
    Ok(books)
}
