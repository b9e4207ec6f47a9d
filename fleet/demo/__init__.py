"""`bitfleet demo`: a whole fleet on this machine (`cli`), and what it leaves behind (`report`)."""
