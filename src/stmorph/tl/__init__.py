"""Tools: embeddings, clustering, stMIC and SENCA-st."""
