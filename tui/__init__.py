"""The Textual dashboard: reads run directories only, never imports training code."""
