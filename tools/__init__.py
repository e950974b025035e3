"""Repository tools: proto generation, the client distribution build."""
