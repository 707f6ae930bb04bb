"""The UI shell (base templates, navigation, static assets, language switch) and the Overview page."""
