//! The retrieved documents and questions of `kvstrata demo`: a multi-turn RAG session
//! about a made-up railway, written for this project (`engine/data/rag/`).

/// The documents, in retrieval order: (file name, text).
pub const DOCUMENTS: &[(&str, &str)] = &[
    (
        "01-larkspur-timetable-policy.txt",
        include_str!("../data/rag/01-larkspur-timetable-policy.txt"),
    ),
    (
        "02-larkspur-fare-rules.txt",
        include_str!("../data/rag/02-larkspur-fare-rules.txt"),
    ),
    (
        "03-larkspur-maintenance-handbook.txt",
        include_str!("../data/rag/03-larkspur-maintenance-handbook.txt"),
    ),
    (
        "04-larkspur-passenger-assistance.txt",
        include_str!("../data/rag/04-larkspur-passenger-assistance.txt"),
    ),
];

const QUESTIONS: &str = include_str!("../data/rag/questions.txt");

/// The user turns of the demo, in order.
pub fn questions() -> Vec<String> {
    QUESTIONS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Every document, each under a `Document N (file):` heading.
pub fn documents_text() -> String {
    let mut text = String::new();
    for (i, (name, body)) in DOCUMENTS.iter().enumerate() {
        text.push_str(&format!(
            "Document {} ({name}):\n{}\n\n",
            i + 1,
            body.trim()
        ));
    }
    text
}

/// The system message of the demo: instructions, then the retrieved documents.
pub fn system_prompt() -> String {
    format!(
        "You are the Larkspur Rail help desk. Answer the passenger's question briefly, \
         using only the documents below.\n\n{}",
        documents_text()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_and_questions_are_there() {
        assert_eq!(DOCUMENTS.len(), 4);
        assert!(
            DOCUMENTS
                .iter()
                .all(|(_, t)| t.split_whitespace().count() > 300)
        );
        assert!(questions().len() >= 5);
        assert!(system_prompt().contains("Document 4"));
    }
}
