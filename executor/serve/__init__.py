"""`executor serve`: OpenAI's Files and Batch APIs and a status page over the queue."""
