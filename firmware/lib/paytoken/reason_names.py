# Display names of paytoken.reasons codes, by code (reasons.name() looks them up).
NAMES = ("ok", "format", "version", "nonce", "key mismatch", "wallet id", "certificate invalid",
         "foreign issuer", "certificate expired", "revoked", "role", "insufficient funds",
         "over payment limit", "over offline limit", "over holding limit", "currency", "amount", "counter",
         "chain", "signature", "declined", "busy", "no receipt", "locked", "payee not found",
         "connection lost", "timeout", "device error")
