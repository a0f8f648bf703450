"""Who a caller is and what they may do: bearer tokens (HMAC, public keys, JWKS), roles and permissions."""
