"""`elvis report`: a re-ranking output as a static results page that opens from disk."""
