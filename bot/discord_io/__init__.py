"""The Discord side of replies: splitting, webhooks as personas, streaming edits, buttons."""
