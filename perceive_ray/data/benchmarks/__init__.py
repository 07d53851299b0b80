"""One adapter per benchmark family, each turning the published on-disk layout into a Manifest."""
