"""Deployment: the OpenAI-compatible API, the web chat UI and the conversation/feedback store."""
